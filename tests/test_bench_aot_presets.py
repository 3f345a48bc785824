"""bench/aot_presets.py: the sweep skips what its JSONL already holds; the tables pick the setting that fits."""
import json

from fixtures import load_bench

GIB = 1 << 30


def row(preset, stage, total_gib, fits, extra=()):
  return {"experiment": f"mm15-{preset}", "stage": stage, "topology": "v5p:4x4x4", "mesh": {"data": 1, "fsdp": 64},
          "overrides": ["mesh.data=1", "mesh.fsdp=-1", *extra], "fits": fits, "out_of_memory": "",
          "batch_shapes": {"tokens": [256, 4096], "images": [256, 28, 672, 672, 3]}, "params_bytes": GIB,
          "opt_state_bytes": 0, "temp_bytes": (total_gib - 1) * GIB, "total_bytes": total_gib * GIB,
          "hbm_bytes": 95 * GIB, "compile_s": 60.0}


def test_summary_and_table():
  bench = load_bench("aot_presets")
  rows = [row("1b", "sft", 109, False), row("1b", "sft", 30, True, ["stages.sft.grad_accum=4"]),
          row("1b", "sft", 55, True, ["stages.sft.grad_accum=2"]), row("1b", "pretrain", 56, True),
          row("3b-moe", "sft", 96, False, ["stages.sft.grad_accum=2"]), row("3b-moe", "sft", 99, False)]
  summary = bench.summary(rows).splitlines()
  assert summary[0] == "| preset | pretrain | sft |"
  # The fitting setting with the lowest grad_accum; a preset that fits nowhere names its closest miss.
  assert summary[2] == "| 1b | as is: 56.0 GiB | grad_accum=2: 55.0 GiB |"
  assert summary[3] == "| 3b-moe | - | NO (closest: grad_accum=2, 96.0 GiB) |"
  assert len(summary) == 4  # presets with no rows are left out
  table = bench.table(rows).splitlines()[2:]
  # Sorted by preset, stage, then settings: as is, grad_accum=2, grad_accum=4.
  assert [line.split("|")[4].strip() for line in table] == [
      "fsdp=64", "fsdp=64", "fsdp=64 grad_accum=2", "fsdp=64 grad_accum=4", "fsdp=64", "fsdp=64 grad_accum=2"]
  assert table[1].split("|")[11].strip() == "NO" and table[2].split("|")[11].strip() == "yes"


def test_sweep_skips_rows_already_there(tmp_path, monkeypatch):
  bench = load_bench("aot_presets")
  out = tmp_path / "aot.jsonl"
  out.write_text(json.dumps(row("1b", "sft", 55, True, ["stages.sft.grad_accum=2"])) + "\n")
  compiled = []
  monkeypatch.setattr(bench, "compile_one", lambda size, stage, topology, sets, out, timeout:
                      compiled.append((size, stage, sets[2:])))
  bench.main(["--out", str(out), "--presets", "1b,7b", "--stages", "ocr,sft",
              "--per-stage", "stages.STAGE.grad_accum=2"])
  assert compiled == [("1b", "ocr", ["stages.ocr.grad_accum=2"]), ("7b", "ocr", ["stages.ocr.grad_accum=2"]),
                      ("7b", "sft", ["stages.sft.grad_accum=2"])]
