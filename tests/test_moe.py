
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm15_jax import sharding
from mm15_jax.config import MeshConfig, MoEConfig
from mm15_jax.models import layers
from mm15_jax.models.moe import MoEFeedForward, upcycle

D, F = 16, 24


def make_moe(**kw):
  cfg = MoEConfig(num_experts=4, top_k=2, every=2, **kw)
  return MoEFeedForward(D, F, cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def silu(x):
  return x / (1 + np.exp(-x))


def naive_moe(moe, x_ND, keep=None):
  """Per-token loop in numpy: softmax router, top-k, renormalise, weighted sum of expert SwiGLUs."""
  router = np.asarray(moe.router[...], np.float64)
  gate, up, down = (np.asarray(getattr(moe, n)[...], np.float64) for n in ("gate", "up", "down"))
  out = np.zeros_like(x_ND, dtype=np.float64)
  for n, x in enumerate(np.asarray(x_ND, np.float64)):
    logits = x @ router
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.argsort(-p, kind="stable")[:moe.top_k]
    w = p[top] / p[top].sum()
    for choice, (e, we) in enumerate(zip(top, w)):
      if keep is not None and not keep(n, choice, e):
        continue
      out[n] += we * ((silu(x @ gate[e]) * (x @ up[e])) @ down[e])
  return out


def test_dropless_matches_naive_loop():
  moe = make_moe()
  x = jax.random.normal(jax.random.key(1), (2, 7, D))
  y, aux = moe(x)
  ref = naive_moe(moe, np.asarray(x).reshape(14, D)).reshape(2, 7, D)
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5, rtol=1e-5)
  assert float(aux["moe_drop_rate"]) == 0.0


def test_aux_losses_match_formula_and_skip_padding():
  moe = make_moe()
  x = jax.random.normal(jax.random.key(2), (1, 10, D))
  mask = np.array([[True] * 6 + [False] * 4])
  _, aux = moe(x, mask)
  xr = np.asarray(x)[0, :6].astype(np.float64)
  logits = xr @ np.asarray(moe.router[...], np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  top = np.argsort(-p, axis=-1, kind="stable")[:, :2]
  frac = np.bincount(top.ravel(), minlength=4) / top.size
  np.testing.assert_allclose(float(aux["moe_load_balance_loss"]), 4 * np.sum(frac * p.mean(0)), rtol=1e-5)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(float(aux["moe_z_loss"]), np.mean(lse ** 2), rtol=1e-5)


def _router_preferring(moe, first, second):
  """Router that sends every (positive-first-feature) token to `first`, then `second`."""
  r = np.zeros((D, 4), np.float32)
  r[0, first], r[0, second] = 3.0, 2.0
  moe.router.set_value(jnp.asarray(r))


def test_capacity_mode_drops_overflow_first_choice_first():
  moe = make_moe(capacity_factor=1.0)
  _router_preferring(moe, first=0, second=1)
  n = 8
  x = np.abs(np.asarray(jax.random.normal(jax.random.key(3), (1, n, D)))) + 0.1
  assert moe.capacity(n) == 4  # ceil(1.0 * 8 tokens * 2 / 4 experts)
  y, aux = moe(jnp.asarray(x))
  # Expert 0 takes the first choices of tokens 0..3, expert 1 the second choices of tokens 0..3: half dropped.
  np.testing.assert_allclose(float(aux["moe_drop_rate"]), 0.5)
  ref = naive_moe(moe, x[0], keep=lambda tok, choice, e: tok < 4).reshape(1, n, D)
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
  assert np.abs(np.asarray(y)[0, 4:]).max() == 0.0


def test_capacity_mode_padding_takes_no_capacity():
  moe = make_moe(capacity_factor=1.0)
  _router_preferring(moe, first=2, second=3)
  x = np.abs(np.asarray(jax.random.normal(jax.random.key(4), (1, 8, D)))) + 0.1
  mask = np.array([[False] * 4 + [True] * 4])  # padding first: it must not fill the experts
  y, aux = moe(jnp.asarray(x), mask)
  assert float(aux["moe_drop_rate"]) == 0.0
  ref = naive_moe(moe, x[0])
  np.testing.assert_allclose(np.asarray(y)[0, 4:], ref[4:], atol=1e-5)


def test_capacity_mode_large_capacity_equals_dropless():
  x = jax.random.normal(jax.random.key(5), (2, 6, D))
  dropless = make_moe()
  capped = make_moe(capacity_factor=4.0)  # capacity = every assignment
  y0, _ = dropless(x)
  y1, aux = capped(x)
  np.testing.assert_allclose(np.asarray(y0), np.asarray(y1), atol=1e-5)
  assert float(aux["moe_drop_rate"]) == 0.0


def test_upcycled_moe_equals_dense_ffn():
  dense = layers.SwiGLU(D, F, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(7))
  moe = upcycle(dense, MoEConfig(num_experts=4, top_k=2), rngs=nnx.Rngs(8))
  x = jax.random.normal(jax.random.key(6), (2, 5, D))
  y, _ = moe(x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(dense(x)), atol=1e-5)
  names = nnx.get_partition_spec(nnx.state(moe))
  assert tuple(names["gate"].get_value()) == ("expert", "embed", "expert_mlp")


def test_expert_params_carry_expert_axis():
  specs = nnx.get_partition_spec(nnx.state(make_moe()))
  for name in ("gate", "up", "down"):
    assert tuple(specs[name].get_value())[0] == "expert"


def test_dropless_routes_per_data_shard_with_the_same_result():
  """On a data=2 x fsdp=4 mesh each shard sorts its own tokens (shard_map): outputs and gradients (input and every
  expert weight) equal the single-device layer's, and the compiled program holds no whole-batch assignment array."""
  moe = make_moe()
  x = jax.random.normal(jax.random.key(1), (8, 5, D))
  graphdef, params = nnx.split(moe)

  def loss(p, x):
    y, aux = nnx.merge(graphdef, p)(x)
    return jnp.sum(y * jnp.sin(jnp.arange(D, dtype=jnp.float32))) + aux["moe_load_balance_loss"], y

  grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  (_, y1), g1 = jax.jit(grad_fn)(params, x)
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4))
  with sharding.use_mesh(mesh):
    xs = jax.device_put(x, sharding.named_sharding(mesh, ("batch", None, None)))
    step = jax.jit(grad_fn)
    (_, y8), g8 = step(params, xs)
    hlo = step.lower(params, xs).as_text()
  assert "shard_map" in hlo or "manual" in hlo.lower()  # the per-shard path was taken
  np.testing.assert_allclose(np.asarray(y8), np.asarray(y1), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(y1), naive_moe(moe, np.asarray(x).reshape(40, D)).reshape(8, 5, D),
                             atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_auto_grouped_matmul_follows_the_platform_traced_for(monkeypatch):
  """"auto" is resolved when the layer is traced, by the mesh's platform (an ahead-of-time TPU compile on a CPU host
  gets ragged_dot), not when it is built."""
  moe = make_moe()
  assert moe.grouped_impl == "auto"
  x = jnp.ones((2, 8, D))
  for platform, ragged in (("cpu", False), ("tpu", True)):
    monkeypatch.setattr(layers, "mesh_platform", lambda platform=platform: platform)
    assert ("ragged_dot" in str(jax.make_jaxpr(lambda x: moe(x))(x))) == ragged, platform
