"""bench/train_parts.py --quick: every part runs on both sides; the attention part computes torch's gradients."""
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
