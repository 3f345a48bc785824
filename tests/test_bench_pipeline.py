"""bench/pipeline.py --quick on the small synthetic corpus: real rates, ratios from the two measurements, realistic
re-encoded images, the comparison with another images module, packing efficiency counted in the batches."""
import io
import json
import statistics
import sys

import pytest
from PIL import Image

from fixtures import corpus_dir, load_bench  # noqa: F401 (fixture)
from mm15_jax.configs import tiny
from mm15_jax.data import records

def test_quick_bench(corpus_dir, tmp_path, capsys):  # noqa: F811 (fixture)
  bench = load_bench("pipeline")
  out = tmp_path / "bench.jsonl"
  # A baseline images module that counts the images it splits (and otherwise is ours).
  baseline = tmp_path / "counting_images.py"
  baseline.write_text("from mm15_jax.data.images import *  # noqa\nfrom mm15_jax.data import images as _ours\n"
                      "CALLS = []\n\ndef split_image(image, *args, **kwargs):\n  CALLS.append(image.shape)\n"
                      "  return _ours.split_image(image, *args, **kwargs)\n")
  # Tiles of 224 px and realistic images at 1/4 of their size keep the test short; the dynamic split's tile counts
  # then differ from 672 px.
  result = bench.main(["--quick", "--data-dir", corpus_dir, "--tile-size", "224", "--image-scale", "0.25",
                       "--compare-images", str(baseline), "--out", str(out)])
  printed = capsys.readouterr().out
  assert json.loads(printed.strip().splitlines()[-1]) == json.loads(out.read_text()) == json.loads(json.dumps(result))
  assert "| realistic | stage 3 SFT, dynamic 4..9 + overview (224) |" in printed
  assert "| synthetic | stage 3 SFT, dynamic 4..9 + overview (224) |" in printed
  assert result["command"].startswith("python bench/pipeline.py --quick") and result["machine"] and result["date"]

  real2, real3, stage2, stage3 = result["throughput"]
  assert all(t["enlarge_on_device"] for t in result["throughput"])  # configs/mm15.py's default
  assert [t["image_source"] for t in result["throughput"]] == ["realistic"] * 2 + ["synthetic"] * 2
  # The baseline built every image of every baseline round: as many as the pipeline's samples hold.
  images_per_setting = [sum(r["images"] for r in t["per_round"]) for t in result["throughput"]]
  assert len(sys.modules["baseline_images"].CALLS) == sum(images_per_setting) > 0
  for t in result["throughput"]:
    first, second = t["per_round"][:2]  # 3 rounds: one pair (one round of each order)
    assert first["baseline_cpu"] > 0 and second["baseline_cpu"] > 0
    assert t["speedup_over_baseline"] == pytest.approx(
        (first["baseline_cpu"] * second["baseline_cpu"] / (first["cpu"] * second["cpu"])) ** 0.5, rel=1e-12)
    assert t["baseline_ratio_pipeline_to_decode"] == pytest.approx(
        (first["decode_cpu"] * second["decode_cpu"] / (first["baseline_cpu"] * second["baseline_cpu"])) ** 0.5,
        rel=1e-12)
    assert t["paired_ratio_pipeline_to_decode"] == pytest.approx(
        (first["decode_cpu"] * second["decode_cpu"] / (first["cpu"] * second["cpu"])) ** 0.5, rel=1e-12)

  # Realistic rows: the same records with every image a JPEG at the stated pixel counts, scaled by 1/4.
  for t, prefix in ((real2, "ocr_"), (real3, "sft_")):
    stats = t["realistic"]
    sizes = bench.REALISTIC[prefix]["sizes"]
    # Each record once per round (cached): at most the images drawn, fewer where a round drew a record twice.
    assert 0 < stats["images"] <= t["images"] and stats["reencode_cpu_s"] > 0
    assert 0.9 * min(w * h for w, h in sizes) / 16 <= stats["median_megapixels"] * 1e6
    assert stats["max_megapixels"] * 1e6 <= 1.1 * max(w * h for w, h in sizes) / 16
  assert real2["realistic"]["median_megapixels"] == pytest.approx(1700 * 2200 / 16 / 1e6, rel=0.02)
  assert real2["samples"] == real2["images"]
  # A realistic record: the synthetic record's fields with a JPEG of the synthetic image's aspect ratio.
  realistic = bench.RealisticImages({"ocr_pdfa": records.open_source(corpus_dir, "ocr_pdfa", "train")}, 0.25)
  original = realistic.sources["ocr_pdfa"].records[0]
  record = realistic.sources["ocr_pdfa"][0]
  assert {k: v for k, v in record.items() if k != "images"} == {k: v for k, v in original.items() if k != "images"}
  with Image.open(io.BytesIO(original["images"][0])) as a, Image.open(io.BytesIO(record["images"][0])) as b:
    assert b.format == "JPEG" and abs(b.width / b.height - a.width / a.height) < 0.01
    assert b.width * b.height == pytest.approx(1700 * 2200 / 16, rel=0.01)
  assert realistic.cpu > 0 and realistic.sources["ocr_pdfa"][0]["images"] == record["images"]  # cached

  for t in (real2, real3, stage2, stage3):
    rounds = t["per_round"]
    assert len(rounds) == t["rounds"] == 3
    assert all(r["samples"] > 0 and r["cpu"] > 0 and r["decode_cpu"] > 0 and r["split_cpu"] > 0 for r in rounds)
    assert t["samples"] == sum(r["samples"] for r in rounds)
    pipe = [r["samples"] / r["cpu"] for r in rounds]
    decode = [r["samples"] / r["decode_cpu"] for r in rounds]
    assert t["pipeline_samples_per_cpu_s"] == pytest.approx(statistics.median(pipe), rel=1e-12)
    assert t["decode_samples_per_cpu_s"] == pytest.approx(statistics.median(decode), rel=1e-12)
    assert t["ratio_pipeline_to_decode"] == pytest.approx(
        statistics.median(r["decode_cpu"] / r["cpu"] for r in rounds), rel=1e-12)
    assert t["pipeline_samples_per_wall_s"] > 0 and t["decode_images_per_cpu_s"] > 0
    # The pipeline decodes and splits every image and more: it cannot be faster than decoding alone.
    assert 0 < t["ratio_pipeline_to_decode"] < 1 and 0 < t["ratio_pipeline_to_fastest_decode"] < 1
    assert all(r["decode_numpy_cpu"] > 0 for r in rounds)
    assert t["ratio_pipeline_to_fastest_decode"] == pytest.approx(
        statistics.median(min(r["decode_cpu"], r["decode_numpy_cpu"]) / r["cpu"] for r in rounds), rel=1e-12)
  assert stage2["images"] == stage2["samples"]  # one page image per OCR sample
  # Stage 2 draws whole units of one sample per source: a multiple of 4 samples.
  assert all(r["samples"] % 4 == 0 for r in stage2["per_round"])

  packings = {p["setting"]: p for p in result["packing"]}
  assert set(packings) == {"mm15 SFT", "mm15 SFT, tokens bind", "tiny SFT", "tiny SFT, tokens bind",
                           "mm15 OCR (stage 2, not SFT)"}
  for p in packings.values():
    # Counted in the batches (segment_ids != 0) by the bench and independently by the packer: the same number.
    assert p["efficiency"] == p["reported_efficiency"]
    assert 0.3 < p["efficiency"] <= 1 and 0 < p["image_slot_efficiency"] <= 1
  assert packings["tiny SFT"]["batches"] == packings["tiny SFT, tokens bind"]["batches"] == 4
  assert packings["mm15 SFT"]["batches"] == 3  # the batches of the synthetic stage-3 throughput run
  assert packings["mm15 SFT, tokens bind"]["max_images"] == 4096 // 144
  assert packings["tiny SFT, tokens bind"]["max_images"] == tiny.get_config().stages[2].data.seq_len // 16
  # With max_images >= seq_len // tokens_per_tile no row can run out of image slots before tokens.
  assert packings["mm15 SFT, tokens bind"]["image_bound_rows"] == packings["tiny SFT, tokens bind"][
      "image_bound_rows"] == 0
  # The demo's 16 slots hold every 384-token row of 1-4 tiles + overview: tokens bind there too (0.955 here).
  assert packings["tiny SFT"]["image_bound_rows"] == 0 and packings["tiny SFT"]["efficiency"] > 0.9


def test_compare_images_refuses_a_module_without_the_current_interface(tmp_path):
  """An images module from before SplitImage.write_tiles cannot stand in for ours: a clear error, not a crash later."""
  old = tmp_path / "old_images.py"
  old.write_text("from typing import NamedTuple\n\nclass SplitImage(NamedTuple):\n  tiles: object\n")
  with pytest.raises(ValueError, match=r"old_images\.py: its SplitImage has no write_tiles"):
    load_bench("pipeline").load_images_module(str(old))
  old.write_text("from typing import NamedTuple\n\nclass SplitImage(NamedTuple):\n  def write_tiles(self, out): pass\n")
  with pytest.raises(ValueError, match=r"no write_sources .* --enlarge-on-host"):
    load_bench("pipeline").load_images_module(str(old))
  assert load_bench("pipeline").load_images_module(str(old), enlarge_on_device=False).SplitImage
