"""Smoke test of `mm15 demo`: synthetic corpus -> three stages -> evaluation, a few steps each."""
import json
import math
import os

import pytest

from mm15_jax import demo

STEPS = 4
NEW_TOKENS = 4  # the untrained model's answers run to the generation budget: keep it short


@pytest.fixture(scope="module")
def image_demo(tmp_path_factory):
  """The image demo at a tiny scale: (workdir, summary)."""
  tmp_path = tmp_path_factory.mktemp("demo")
  overrides = []
  for stage in ("pretrain", "ocr", "sft"):
    overrides += [f"stages.{stage}.steps={STEPS}", f"stages.{stage}.log_every=1",
                  f"stages.{stage}.warmup_fraction=0.0"]
  overrides += [f"stages.sft.eval_every={STEPS}", "stages.sft.eval_max_examples=4",
                "stages.sft.eval_benchmarks=sft_general"]
  return tmp_path, demo.run(str(tmp_path), scale=0.03, overrides=overrides, max_eval_examples=4,
                            max_new_tokens=NEW_TOKENS)


def test_demo_runs_all_stages_and_evaluates(image_demo):
  tmp_path, summary = image_demo
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert [s["name"] for s in on_disk["stages"]] == ["pretrain", "ocr", "sft"]
  for stage in on_disk["stages"]:
    assert stage["steps"] == STEPS
    assert math.isfinite(stage["loss_first"]) and math.isfinite(stage["loss_last"])
    assert stage["loss_last"] < stage["loss_first"], stage
    assert os.path.isdir(tmp_path / stage["name"] / "checkpoints" / str(STEPS))
    lines = (tmp_path / stage["name"] / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert [m["step"] for m in logged if "loss" in m] == list(range(1, STEPS + 1))
    assert os.listdir(tmp_path / stage["name"] / "tb")
  # periodic evaluation during SFT lands in the same log
  sft_log = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
  assert any("eval/sft_general" in m and m["step"] == STEPS for m in sft_log)
  categories = on_disk["eval"]["categories"]
  assert {"General", "Text-rich", "Refer&Ground"} <= set(categories)
  for scores in categories.values():
    assert 0.0 <= scores["score"] <= 1.0 and 0.0 <= scores["baseline"] <= 1.0
  assert summary["eval"]["categories"] == categories
  assert (tmp_path / "eval" / "categories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("variant,stage,category", [("video", "video_sft", "Video"), ("ui", "sft_ui", "UI")])
def test_demo_variant_continues_the_image_checkpoint(image_demo, variant, stage, category, capsys):
  workdir, _ = image_demo
  image_steps = sorted(os.listdir(workdir / "sft" / "checkpoints"))
  overrides = [f"stages.{stage}.steps=3", f"stages.{stage}.log_every=1", f"stages.{stage}.warmup_fraction=0.0"]
  summary = demo.run(str(workdir), variant=variant, scale=0.03, overrides=overrides, max_eval_examples=4,
                     max_new_tokens=NEW_TOKENS)

  out = capsys.readouterr().out
  assert "running the image demo first" not in out  # the image checkpoint is reused, not retrained
  assert sorted(os.listdir(workdir / "sft" / "checkpoints")) == image_steps
  corpus = json.loads((workdir / "data" / "corpus.json").read_text())
  assert f"{variant}_datasets" in corpus and "datasets" in corpus
  on_disk = json.loads((workdir / variant / "summary.json").read_text())
  assert on_disk["variant"] == variant and [s["name"] for s in on_disk["stages"]] == [stage]
  assert on_disk["stages"][0]["steps"] == 3 and math.isfinite(on_disk["stages"][0]["loss_last"])
  assert os.path.isdir(workdir / variant / stage / "checkpoints" / "3")
  meta = json.loads((workdir / variant / stage / "metrics.jsonl").read_text().splitlines()[0])
  assert meta["step"] == 1
  scores = on_disk["eval"]["categories"][category]
  assert 0.0 <= scores["score"] <= 1.0 and scores["baseline"] is not None
  assert set(on_disk["eval"]["categories"]) == {category}  # only the variant's own held-out sets
  assert (workdir / variant / "eval" / "categories.png").exists()
  assert ("training_free" in on_disk) == (variant == "video")
  if variant == "video":
    assert set(on_disk["training_free"]["categories"]) == {"Video"}
  assert summary["eval"]["categories"] == on_disk["eval"]["categories"]
  assert f"{category:<14}" in out and "one held-out example per category" in out


def test_demo_rejects_an_unknown_variant(tmp_path):
  with pytest.raises(ValueError, match="demo variant 'audio'"):
    demo.run(str(tmp_path), variant="audio")
