"""bench/train_step.py --quick: our step and LLaVA's built at the same sizes (no timing assertions)."""
import json
import math
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fixtures import load_bench, run_bench_main  # noqa: E402
from mm15_jax.train import flops as flops_lib  # noqa: E402

@pytest.fixture(scope="module")
def bench():
  return load_bench("train_step")


@pytest.fixture(scope="module")
def quick(bench):
  """(result, printed lines) of `bench/train_step.py --quick --steps 1` (one torch thread: no pile-up of spinning
  threads on a shared test host; nothing below is timed)."""
  return run_bench_main(bench, ["--quick", "--steps", "1", "--torch-threads", "1"])


# ------------------------------------------------------------------------------------------------------------------
# Analytic parameter counts, written out independently of both models.


def vit_params(v, image_size):
  w, m = v.width, v.mlp_dim
  grid = image_size // v.patch_size
  block = 4 * (w * w + w) + 2 * 2 * w + (w * m + m) + (m * w + w)
  return v.patch_size ** 2 * 3 * w + w + (1 + grid * grid) * w + 2 * w + v.depth * block


def bottleneck_params(in_ch, out_ch, se_ratio):
  se = int(round(in_ch * se_ratio))
  n = in_ch * out_ch + 2 * out_ch + 9 * out_ch + 2 * out_ch + out_ch * out_ch + 2 * out_ch
  n += (out_ch * se + se + se * out_ch + out_ch) if se else 0
  return n + ((in_ch * out_ch + 2 * out_ch) if in_ch != out_ch else 0)


def c_abstractor_params(c, in_dim, out_dim, grid):
  n = grid * grid * in_dim
  n += sum(bottleneck_params(in_dim if i == 0 else c.hidden, c.hidden, c.se_ratio) for i in range(c.depth))
  n += c.depth * bottleneck_params(c.hidden, c.hidden, c.se_ratio)
  return n + c.hidden * out_dim + out_dim + out_dim * out_dim + out_dim


def decoder_params(d):
  hd = d.head_dim or d.d_model // d.num_heads
  attn = d.d_model * hd * (2 * d.num_heads + 2 * d.num_kv_heads)
  layer = attn + 3 * d.d_model * d.ffn_dim + 2 * d.d_model
  return 2 * d.vocab_size * d.d_model + d.num_layers * layer + d.d_model


def test_parameter_counts_match_the_analytic_ones(bench, quick):
  result, _ = quick
  cfg, shapes = bench.bench_config(quick=True), bench.bench_shapes(quick=True)
  v, d = cfg.vision, cfg.decoder
  grid = shapes.image_size // v.patch_size
  ours, theirs = result["params"]["ours"], result["params"]["torch"]
  assert ours["vision"] == vit_params(v, shapes.image_size)
  assert theirs["vision"] == vit_params(v, shapes.image_size) + 2 * v.width  # CLIP's unused post-LayerNorm
  assert ours["decoder"] == theirs["decoder"] == decoder_params(d)
  assert ours["connector"] == c_abstractor_params(cfg.connector, v.width, d.d_model, grid)
  assert theirs["connector"] == v.width * d.d_model + d.d_model + d.d_model * d.d_model + d.d_model
  assert result["params"]["ours_total"] == sum(ours.values())
  assert result["params"]["torch_total"] == sum(theirs.values())
  # The real benchmark sizes: the same decoder and ViT on both sides too.
  full = bench.bench_config()
  full_shapes = bench.bench_shapes()
  counts = bench.param_counts_ours(full)
  assert counts["decoder"] == decoder_params(full.decoder)
  assert counts["vision"] == vit_params(full.vision, full_shapes.image_size)


def test_flops_differ_by_the_connectors_only(bench, quick):
  result, _ = quick
  cfg, shapes = bench.bench_config(quick=True), bench.bench_shapes(quick=True)
  f = result["flops"]
  images, k = shapes.batch * shapes.images_per_row, result["tokens_per_image"]
  d, w = cfg.decoder.d_model, cfg.vision.width
  assert f["connector_torch"] == 3 * images * 2 * k * (w * d + d * d)
  assert f["ours"] == flops_lib.train_step_flops(cfg, batch_size=shapes.batch, seq_len=shapes.seq_len,
                                                 max_images=shapes.images_per_row, tile_size=shapes.image_size)
  assert f["ours"] - f["torch"] == f["connector_ours"] - f["connector_torch"] > 0
  assert f["ours"] == f["vit"] + f["connector_ours"] + f["decoder"]


def test_one_step_each_trains(quick):
  result, _ = quick
  vocab = 512
  for side in ("ours", "torch"):
    first, last = result["first_loss"][side], result["last_loss"][side]
    assert math.isfinite(first) and math.isfinite(last)
    # Near-uniform predictions at initialisation (ours: logits of std ~1 add ~0.5 nats).
    assert abs(first - math.log(vocab)) < 0.75, (side, first)
    assert last < first, side  # the same batch again after two updates
  # Every parameter moved except LLaVA's CLIP post-LayerNorm, which the selected features never pass through;
  # attention key biases have a zero gradient up to rounding, so they may stay put.
  assert set(result["params_unchanged_by_first_step"]["ours"]) <= {"vision/blocks/attn/k_bias"}
  post_ln = {"model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"}
  unchanged = set(result["params_unchanged_by_first_step"]["torch"])
  assert post_ln <= unchanged and unchanged - post_ln <= {"model.vision_tower.encoder.layers.0.self_attn.k_proj.bias"}


def test_json_line_and_table(quick):
  result, lines = quick
  assert json.loads(lines[-1]) == json.loads(json.dumps(result))
  for key in ("date", "command", "machine", "versions", "shapes", "params", "flops", "step_s_median",
              "step_cpu_s_median", "tokens_per_s", "speed_ratio_ours_over_torch", "speed_ratio_per_round_median",
              "speed_ratio_cpu_time", "matmul_flops_per_s", "mfu_of_matmul", "attention", "times_s"):
    assert key in result, key
  assert result["command"] == "python bench/train_step.py --quick --steps 1 --torch-threads 1"
  assert result["machine"]["cpus"] == os.cpu_count() and result["machine"]["cpu_model"]
  assert result["versions"]["jax"] == jax.__version__ and result["versions"]["torch"] == torch.__version__
  assert {len(t["wall"]) for t in result["times_s"].values()} == {1}
  tokens = result["shapes"]["batch"] * result["shapes"]["seq_len"]
  for side in ("ours", "torch"):
    assert result["tokens_per_s"][side] == pytest.approx(tokens / result["step_s_median"][side])
  assert result["speed_ratio_ours_over_torch"] == pytest.approx(
      result["step_s_median"]["torch"] / result["step_s_median"]["ours"])
  assert result["mfu_of_matmul"]["ours"] == pytest.approx(
      result["flops"]["ours"] / result["step_s_median"]["ours"] / result["matmul_flops_per_s"]["jax"])
  assert "| tokens/s |" in "\n".join(lines) and lines[-2].startswith("ours / torch speed:")


def test_batch_contract(bench):
  cfg, shapes = bench.bench_config(quick=True), bench.bench_shapes(quick=True)
  batch = bench.make_batch(cfg, shapes)
  k = bench.tokens_per_image(cfg, shapes)
  placeholders = (batch.tokens == bench.IMAGE_TOKEN_ID).sum(1)
  np.testing.assert_array_equal(placeholders, shapes.images_per_row * k)
  np.testing.assert_array_equal(batch.tokens[:, 1:], batch.targets[:, :-1])
  np.testing.assert_array_equal(batch.loss_mask == 0, batch.targets == bench.IMAGE_TOKEN_ID)
  assert batch.images.shape == (shapes.batch, shapes.images_per_row, shapes.image_size, shapes.image_size, 3)
  with pytest.raises(ValueError, match="pooled_side"):
    cfg.connector.pooled_side += 1
    bench.tokens_per_image(cfg, shapes)


# ------------------------------------------------------------------------------------------------------------------


def test_mixed_precision_run_trains_both_sides(bench):
  """--dtype bfloat16: bfloat16 compute on both sides (float32 parameters), both still learn the batch."""
  result, lines = run_bench_main(bench, ["--quick", "--steps", "1", "--torch-threads", "1", "--dtype", "bfloat16"])
  assert result["model"]["dtype"] == "bfloat16" and any("bfloat16 matmul GFLOP/s" in line for line in lines)
  for side in ("ours", "torch"):
    first, last = result["first_loss"][side], result["last_loss"][side]
    assert abs(first - math.log(512)) < 0.75 and last < first, (side, first, last)
