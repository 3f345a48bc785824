import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm15_jax.config import ConnectorConfig
from mm15_jax.models import layers
from mm15_jax.models.connector import CAbstractor, adaptive_avg_pool, depthwise_conv3x3, depthwise_conv3x3_native

CFG = ConnectorConfig(hidden=32, depth=1, pooled_side=2)


def build(cfg=CFG, in_dim=24, side=4):
  return CAbstractor(cfg, in_dim=in_dim, out_dim=64, grid_side=side, dtype="float32", rngs=nnx.Rngs(0))


def test_pool_windows_follow_pytorch_rule():
  m = layers.adaptive_avg_pool_matrix(5, 2)  # windows [0, 3) and [2, 5): they overlap
  np.testing.assert_allclose(m, [[1 / 3, 1 / 3, 1 / 3, 0, 0], [0, 0, 1 / 3, 1 / 3, 1 / 3]])
  m = layers.adaptive_avg_pool_matrix(48, 12)  # exact 4x4 windows
  np.testing.assert_allclose(m, np.kron(np.eye(12), np.full((1, 4), 0.25)))
  m = layers.adaptive_avg_pool_matrix(27, 12)
  for i in range(12):
    start, end = (i * 27) // 12, -(-((i + 1) * 27) // 12)
    np.testing.assert_allclose(m[i, start:end], 1 / (end - start))
    assert m[i].sum() == 1.0 and (m[i] > 0).sum() == end - start
  x = np.random.RandomState(0).randn(1, 7, 7, 3).astype(np.float32)
  out = np.asarray(adaptive_avg_pool(jnp.asarray(x), 3))
  for i in range(3):
    for j in range(3):
      ys, ye = (i * 7) // 3, -(-((i + 1) * 7) // 3)
      xs, xe = (j * 7) // 3, -(-((j + 1) * 7) // 3)
      np.testing.assert_allclose(out[0, i, j], x[0, ys:ye, xs:xe].mean((0, 1)), atol=1e-6)


def test_depthwise_conv_on_cpu_equals_native_convolution_values_and_gradients():
  """The CPU form (nine shifted products) against XLA's grouped convolution, which other platforms run."""
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (2, 5, 7, 6))  # H != W: the shifts are not transposed
  k = jax.random.normal(keys[1], (3, 3, 1, 6))
  cotangent = jax.random.normal(keys[2], x.shape)
  assert layers.mesh_platform() == "cpu"
  loss = lambda conv: lambda x, k: (conv(x, k) * cotangent).sum()
  np.testing.assert_allclose(depthwise_conv3x3(x, k), depthwise_conv3x3_native(x, k), rtol=1e-5, atol=1e-5)
  for ours, native in zip(jax.grad(loss(depthwise_conv3x3), (0, 1))(x, k),
                          jax.grad(loss(depthwise_conv3x3_native), (0, 1))(x, k)):
    np.testing.assert_allclose(ours, native, rtol=1e-5, atol=1e-5)
  assert not np.allclose(depthwise_conv3x3(x, k), depthwise_conv3x3(x, k[::-1]), atol=1e-3)  # orientation matters


def silu(x):
  return x / (1 + np.exp(-x))


def ln(x, p, eps=1e-6):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p.scale[...]) + np.asarray(p.bias[...])


def ref_bottleneck(x, blk):
  """timm RegNet Bottleneck (bottle_ratio 1, group size 1) written with explicit loops."""
  h = silu(ln(x @ np.asarray(blk.conv1.kernel[...]), blk.conv1.norm))
  k = np.asarray(blk.dw_kernel[...])[:, :, 0, :]
  pad = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
  dw = np.zeros_like(h)
  for dy in range(3):
    for dx in range(3):
      dw += pad[:, dy:dy + h.shape[1], dx:dx + h.shape[2]] * k[dy, dx]
  h = silu(ln(dw, blk.dw_norm))
  s = h.mean((1, 2), keepdims=True)
  s = silu(s @ np.asarray(blk.se_reduce.kernel[...]) + np.asarray(blk.se_reduce.bias[...]))
  s = s @ np.asarray(blk.se_expand.kernel[...]) + np.asarray(blk.se_expand.bias[...])
  h = h * (1 / (1 + np.exp(-s)))
  h = ln(h @ np.asarray(blk.conv3.kernel[...]), blk.conv3.norm)
  short = x if blk.shortcut is None else ln(x @ np.asarray(blk.shortcut.kernel[...]), blk.shortcut.norm)
  return silu(h + short)


def ref_connector(model, x_BLD):
  b, n, d = x_BLD.shape
  side = int(n ** 0.5)
  x = (x_BLD + np.asarray(model.pos_embedding[...])).reshape(b, side, side, d)
  for blk in model.stage1.blocks:
    x = ref_bottleneck(x, blk)
  m = layers.adaptive_avg_pool_matrix(side, model.pooled_side)
  x = np.einsum("oh,pw,bhwc->bopc", m, m, x)
  for blk in model.stage2.blocks:
    x = ref_bottleneck(x, blk)
  x = x.reshape(b, -1, x.shape[-1])
  r1, r2 = model.readout1, model.readout2
  x = silu(x @ np.asarray(r1.kernel[...]) + np.asarray(r1.bias[...]))
  return x @ np.asarray(r2.kernel[...]) + np.asarray(r2.bias[...])


def test_matches_loop_reference_and_shapes():
  model = build(ConnectorConfig(hidden=32, depth=2, pooled_side=2), side=5)
  x = np.random.RandomState(1).randn(2, 25, 24).astype(np.float32)
  out = np.asarray(model(jnp.asarray(x)))
  assert out.shape == (2, 4, 64)
  assert model.stage1.blocks[0].shortcut is not None and model.stage1.blocks[1].shortcut is None
  assert model.stage1.blocks[0].se_reduce.kernel.shape == (32, 6)  # round(in_chs 24 * 0.25)
  np.testing.assert_allclose(out, ref_connector(model, x.astype(np.float64)), atol=1e-5, rtol=1e-5)


def test_other_resolution_interpolates_position_embedding():
  model = build()
  x = np.random.RandomState(2).randn(1, 64, 24).astype(np.float32)  # 8x8 grid, stored 4x4
  out = model(jnp.asarray(x))
  assert out.shape == (1, 4, 64)
  model.pos_embedding.set_value(
      layers.resize_grid_bicubic(model.pos_embedding[...].reshape(4, 4, 24), 8, 8).reshape(64, 24))
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), np.asarray(out), atol=1e-6)


def test_pooled_side_configurable_and_names():
  model = build(ConnectorConfig(hidden=32, depth=1, pooled_side=3), side=6)
  assert model(jnp.zeros((1, 36, 24))).shape == (1, 9, 64)
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  for spec, leaf in zip(jax.tree.leaves(specs), jax.tree.leaves(nnx.state(model, nnx.Param))):
    assert len(tuple(spec)) == leaf.ndim
