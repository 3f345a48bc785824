"""bench/train_parts.py --quick: every part runs on both sides; the attention and head parts compute torch's
gradients."""
import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fixtures import load_bench, run_bench_main  # noqa: E402


@pytest.fixture(scope="module")
def bench():
  return load_bench("train_parts")


def test_quick_run_reports_every_part(bench):
  result, lines = run_bench_main(bench, ["--quick", "--rounds", "1", "--torch-threads", "1"])
  assert json.loads(lines[-1]) == json.loads(json.dumps(result))
  assert set(result["parts"]) == set(bench.PARTS)
  for part in bench.PARTS:
    assert any(line.startswith(f"| {part} |") for line in lines)
    p = result["parts"][part]
    assert p["ours_s"] > 0 and p["torch_s"] > 0 and p["time_ratio_per_round"] > 0


def test_attention_sides_compute_the_same_gradients(bench):
  cfg = bench.train_step_lib.bench_config(quick=True).decoder
  pair = bench.attention_pair(cfg, 2, 160)  # longer than decoder.CAUSAL_BLOCK: the blocked attention on CPU
  ours = pair["ours"]()
  theirs = [g.transpose(1, 2).numpy() for g in pair["torch"]()]  # [B, heads, T, K] -> [B, T, heads, K]
  for name, a, b in zip("qkv", ours, theirs):
    assert np.abs(b).max() > 0
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_head_sides_compute_the_same_gradients(bench):
  """Our fused, chunked loss (chunks skipped where no token counts) against torch's logits of every position."""
  cfg = dataclasses.replace(bench.train_step_lib.bench_config(quick=True), loss_chunk=8)
  batch = bench.train_step_lib.make_batch(cfg, bench.train_step_lib.bench_shapes(quick=True))
  counted = batch.loss_mask.sum(1)
  assert counted.max() <= batch.loss_mask.shape[1] - cfg.loss_chunk  # the last chunk is skipped
  pair = bench.head_pair(cfg, batch)
  for name, a, b in zip(("dx", "dw"), pair["ours"](), pair["torch"]()):
    assert b.abs().max() > 0
    np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
