"""The benchmarks in bench/ run (--quick) and measure what they claim: equal active FLOPs, finite results, saved
checkpoints that restore, one compiled step per depth. No timing is asserted (the machine is shared)."""
import json

from fixtures import load_bench as load
from mm15_jax import cli
from mm15_jax.train import aot
from mm15_jax.train import stage as stage_lib


def test_moe_quick(capsys):
  moe = load("moe")
  rows = moe.main(["--quick"])
  cases = {(r["tokens"], r["d_model"], r["expert_width"], r["experts"]) for r in rows}
  assert cases == set(moe.QUICK_CASES)
  for tokens, d_model, width, experts in cases:
    variants = {r["variant"]: r for r in rows if (r["tokens"], r["experts"], r["expert_width"]) == (tokens, experts,
                                                                                                       width)}
    assert {"dense", "blocked", "capacity"} <= set(variants)
    assert ("ragged" in variants) == (experts <= 8)  # the first (only) quick case with E <= 8
    # Top-2 of E experts of width f: gate, up and down of two experts per token == one dense SwiGLU of width 2f.
    expected = 2 * 3 * d_model * (moe.TOP_K * width)
    assert {r["active_matmul_flops_per_token"] for r in variants.values()} == {expected}
    assert variants["dense"]["router_flops_per_token"] == 0
    assert variants["blocked"]["router_flops_per_token"] == 2 * d_model * experts
    for r in variants.values():
      assert r["finite"], r["variant"]
      assert len(r["times_s"]) == 3 and r["median_ms"] > 0
    if "ragged" in variants:
      assert variants["ragged"]["input_grad_max_rel_diff_vs_blocked"] < 1e-5
  out = capsys.readouterr().out
  assert out.count("| 1024 |") == len(rows) and '"bench": "moe"' in out


def test_checkpoint_stall_quick(capsys):
  bench = load("checkpoint_stall")
  r = bench.main(["--quick"])
  assert (r["steps"], r["every"]) == (6, 2)
  assert len(r["save_blocking_s"]) == len(r["blocking_share_of_step"]) == 3
  assert r["checkpoint_steps"] == [4, 6]           # keep_checkpoints=2 removed step 2
  assert r["latest_step"] == r["saved_step"] == r["restored_meta_step"] == 6
  assert r["restored_equal"]
  assert len(r["orbax_s"]["background_write"]) == 3  # every save was asynchronous
  assert r["param_bytes"] > 1 << 20
  assert '"bench": "checkpoint_stall"' in capsys.readouterr().out


def test_compile_depth_quick(capsys):
  bench = load("compile_depth")
  rows = bench.main(["--quick"])
  assert [(r["layers"], r["scan_layers"]) for r in rows] == [(2, True), (2, False), (4, True), (4, False)]
  by = {(r["layers"], r["scan_layers"]): r for r in rows}
  assert by[(4, True)]["num_params"] > by[(2, True)]["num_params"] == by[(2, False)]["num_params"]
  # The unrolled program grows with depth; the scanned one holds one unit whatever the depth.
  unrolled_growth = by[(4, False)]["hlo_chars"] - by[(2, False)]["hlo_chars"]
  scanned_growth = abs(by[(4, True)]["hlo_chars"] - by[(2, True)]["hlo_chars"])
  assert unrolled_growth > 10 * max(scanned_growth, 1)
  assert all(r["compile_s"] > 0 and r["lower_s"] > 0 for r in rows)
  out = capsys.readouterr().out
  assert "| 2 |" in out and "| 4 |" in out and '"bench": "compile_depth"' in out


def test_roofline_depth_extrapolates_linearly_in_each_stack(tmp_path, capsys):
  """Three shallow compiles' lines (made here, linear in decoder layers d and ViT blocks v) -> the figures at the
  preset's depths, with the attention kernels' FLOPs added to the compute term."""
  bench = load("roofline_depth")
  out = tmp_path / "rows.jsonl"
  sets = ["mesh.data=1", "mesh.fsdp=-1", "stages.sft.grad_accum=1"]
  linear = lambda d, v: 1e12 + 3e12 * d + 5e12 * v  # FLOPs; HBM bytes and collective bytes scaled from it
  with open(out, "w") as f:
    for d, v in bench.DEPTHS:
      f.write(json.dumps({
          "experiment": "mm15-3b", "stage": "sft", "num_devices": 64, "device_kind": "TPU v5",
          "overrides": sets + ["model.scan_layers=false", f"model.decoder.num_layers={d}", f"model.vision.depth={v}"],
          "flops": linear(d, v), "bytes_accessed": linear(d, v) / 100,
          "collective_bytes": {"all-reduce": int(linear(d, v) / 1000)}}) + "\n")
  bench.main(["--size", "3b", "--stage", "sft", "--out", str(out)])
  text = capsys.readouterr().out
  exp = cli.load_experiment("mm15", ["size=3b"], sets)
  model = stage_lib.stage_model_config(exp.model, exp.stages[2], exp.model.decoder.vocab_size)
  assert (model.decoder.num_layers, model.vision.depth) == (28, 32)
  kernels = aot.attention_kernel_flops(model, exp.stages[2], "tpu") / 64
  assert kernels > 0
  assert f"{linear(28, 32) + kernels:.3e} FLOPs ({linear(28, 32):.3e} XLA + {kernels:.3e} in attention" in text
  assert f"= {linear(28, 32) / 100:.3e} B / " in text and "ESTIMATE on v5p" in text
