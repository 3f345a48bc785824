"""Splash attention (Pallas, interpret mode on CPU) against dense attention: values and gradients of the decoder's
causal attention with packed segments, padding and grouped-query heads, of the ViT's full attention, in float32 and
bfloat16, on one device and under shard_map on a mesh; and through the decoder and the ViT selected by
model.attention."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fixtures import mesh_of
from mm15_jax import sharding
from mm15_jax.config import DecoderConfig, MeshConfig, VisionConfig
from mm15_jax.kernels import attention as attention_lib
from mm15_jax.kernels import splash
from mm15_jax.models import decoder as dec
from mm15_jax.models import vit


def packed_segments(lengths, total):
  ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(total - sum(lengths))])
  return jnp.asarray(ids, jnp.int32)


def qkv(b, t, h, g, hd, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(key, (b, t, n, hd)).astype(dtype) for key, n in zip(keys, (h, g, g)))
  return q, k, v, jax.random.normal(keys[3], (b, t, h, hd))


def value_and_grads(attend, cotangent, q, k, v):
  loss = lambda q, k, v: ((out := attend(q, k, v)).astype(jnp.float32) * cotangent).sum()
  out = jax.jit(attend)(q, k, v)
  return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def assert_close(got, want, atol, rtol=0.0):
  out, grads = got
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want[0], np.float32), atol=atol, rtol=rtol)
  for name, a, w in zip("qkv", grads, want[1]):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(w, np.float32), atol=atol, rtol=rtol,
                               err_msg=f"d{name}")


# Row 0: three packed segments then padding (the first query block ends inside segment 2); row 1: one segment.
# 200 tokens: padded to 256 for the kernel (one 256 block).
T = 200
SEGMENTS = jnp.stack([packed_segments([90, 70, 25], T), jnp.ones((T,), jnp.int32)])


def causal(impl):
  return lambda q, k, v: attention_lib.causal_attention(q, k, v, SEGMENTS, jnp.float32, impl=impl)


def test_splash_causal_packed_gqa_matches_dense():
  q, k, v, cot = qkv(2, T, 4, 2, 16)
  assert splash.block_size(256) == 256
  want = value_and_grads(causal("dense"), cot, q, k, v)
  assert_close(value_and_grads(causal("splash"), cot, q, k, v), want, atol=1e-5)
  # the segments matter: one segment per row gives other values
  one_segment = attention_lib.causal_attention(q, k, v, jnp.ones((2, T), jnp.int32), jnp.float32, impl="splash")
  assert not np.allclose(np.asarray(one_segment[0]), np.asarray(want[0][0]), atol=1e-3)


def test_splash_bfloat16_matches_dense_float32():
  q, k, v, cot = qkv(2, T, 4, 2, 16, jnp.bfloat16)
  bf16 = lambda q, k, v: attention_lib.causal_attention(q, k, v, SEGMENTS, jnp.bfloat16, impl="splash")
  got = value_and_grads(bf16, cot, q, k, v)
  assert got[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got[1])
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  assert_close(got, value_and_grads(causal("dense"), cot, *f32), atol=0.05, rtol=0.05)


def test_splash_full_attention_vit_shape_matches_dense():
  """ViT rows: a class token plus a 9 x 9 patch grid (82 tokens, padded to 128), full mask, as many kv heads as
  query heads."""
  q, k, v, cot = qkv(3, 82, 4, 4, 16, seed=1)
  full = lambda impl: (lambda q, k, v: attention_lib.full_attention(q, k, v, jnp.float32, impl=impl))
  assert_close(value_and_grads(full("splash"), cot, q, k, v), value_and_grads(full("dense"), cot, q, k, v),
               atol=1e-5)


def test_splash_under_shard_map_matches_dense():
  """data=4 x tensor=2: each device runs the kernel on its rows and kv groups (shard_map)."""
  q, k, v, cot = qkv(4, 128, 4, 2, 16, seed=2)
  seg = jnp.stack([packed_segments([50, 60], 128), jnp.ones((128,), jnp.int32),
                   packed_segments([128], 128), packed_segments([10, 100], 128)])
  attend = lambda impl: (lambda q, k, v: attention_lib.causal_attention(q, k, v, seg, jnp.float32, impl=impl))
  want = value_and_grads(attend("dense"), cot, q, k, v)
  mesh = mesh_of(MeshConfig(data=4, tensor=2))
  with sharding.use_mesh(mesh):
    got = value_and_grads(attend("splash"), cot, q, k, v)
    assert "manual_computation" in jax.jit(attend("splash")).lower(q, k, v).as_text()  # shard_map under Shardy
  assert_close(got, want, atol=1e-5)


def test_decoder_with_splash_matches_dense():
  """model.attention="splash" through the decoder (128 tokens, two packed segments and padding): logits and
  parameter gradients equal the dense attention's."""
  t = 128
  cfg = DecoderConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, ffn_dim=64, max_len=t)
  tokens = jax.random.randint(jax.random.key(1), (2, t), 0, 64)
  seg = jnp.stack([packed_segments([60, 50], t), packed_segments([t], t)])
  pos = jnp.stack([jnp.concatenate([jnp.arange(60), jnp.arange(50), jnp.zeros(18, int)]), jnp.arange(t)])

  def loss(m):
    logits, _, _ = m(m.embed(tokens), seg, pos.astype(jnp.int32))
    return (logits * jnp.sin(jnp.arange(64.0))).mean(), logits

  results = {impl: nnx.jit(nnx.value_and_grad(loss, has_aux=True))(
      dec.Decoder(cfg, dtype="float32", attention=impl, rngs=nnx.Rngs(0))) for impl in ("dense", "splash")}
  (_, got), got_grads = results["splash"]
  (_, want), want_grads = results["dense"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=1e-4, err_msg=str(path))


def test_vit_with_splash_matches_dense():
  cfg = VisionConfig(image_size=28, patch_size=7, width=32, depth=1, num_heads=2, mlp_dim=64)
  images = jax.random.normal(jax.random.key(2), (2, 28, 28, 3))
  build = lambda impl: vit.VisionTransformer(cfg, dtype="float32", attention=impl, rngs=nnx.Rngs(0))
  out = {impl: jax.jit(lambda x, m=build(impl): m(x))(images) for impl in ("dense", "splash")}
  np.testing.assert_allclose(np.asarray(out["splash"]), np.asarray(out["dense"]), atol=2e-5)


def test_cudnn_needs_a_gpu():
  with pytest.raises(ValueError, match="model.attention='cudnn' needs a GPU"):
    attention_lib.resolve("cudnn", "cpu")
  assert attention_lib.resolve("cudnn", "gpu") == "cudnn"


def test_vit_model_config_carries_the_kernel():
  cfg = VisionConfig(image_size=28, patch_size=7, width=32, depth=1, num_heads=2, mlp_dim=64)
  with pytest.raises(ValueError, match="model.attention='flash'"):
    vit.VisionTransformer(dataclasses.replace(cfg), attention="flash", rngs=nnx.Rngs(0))


def _subjaxprs(params: dict):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else [value]:
      if hasattr(item, "eqns"):
        yield item
      elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
        yield item.jaxpr


def _dots(jaxpr) -> int:
  return sum(e.primitive.name == "dot_general" for e in jaxpr.eqns) + sum(
      _dots(sub) for e in jaxpr.eqns for sub in _subjaxprs(e.params))


def _kernel_dots(jaxpr) -> list[int]:
  """Per pallas_call in `jaxpr` (nested ones included), the matmuls its kernel body holds."""
  counts = []
  for e in jaxpr.eqns:
    if e.primitive.name == "pallas_call":
      counts.append(_dots(e.params["jaxpr"]))
    else:
      counts += [n for sub in _subjaxprs(e.params) for n in _kernel_dots(sub)]
  return counts


def test_train_flops_per_forward_counts_the_kernels_matmuls():
  """The analytic FLOPs the roofline estimate adds for splash attention (XLA's cost analysis does not see inside
  Pallas kernels): the forward kernel's matmuls against those of forward + backward, from the traced kernels."""
  q, k, v, cot = qkv(1, 256, 2, 2, 32)
  attend = lambda q, k, v: splash.attention(q, k, v, None, causal=True)
  loss = lambda q, k, v: (attend(q, k, v) * cot).sum()
  forward = _kernel_dots(jax.make_jaxpr(attend)(q, k, v).jaxpr)
  train = _kernel_dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr)
  assert forward == [2]
  assert sum(train) / sum(forward) == splash.train_flops_per_forward("none")
  rematerialised = jax.make_jaxpr(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, k, v).jaxpr
  assert sum(_kernel_dots(rematerialised)) / sum(forward) == splash.train_flops_per_forward("full")
