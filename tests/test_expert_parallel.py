"""Expert-parallel MoE (mesh.expert > 1): values and gradients equal the single-device layer's; the compiled program
exchanges tokens by all-to-all and never gathers every expert's weights; a bounded slot drops exactly the overflow."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fixtures import mesh_of
from mm15_jax import sharding
from mm15_jax.config import MeshConfig, MoEConfig
from mm15_jax.models import multimodal
from mm15_jax.models.moe import MoEFeedForward

D, F, E, K = 16, 24, 8, 2


def make_moe(**kw):
  cfg = MoEConfig(num_experts=E, top_k=K, **kw)
  return MoEFeedForward(D, F, cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(3))


def silu(x):
  return x / (1 + np.exp(-x))


def loss_fn(graphdef):
  def loss(p, x, mask):
    y, aux = nnx.merge(graphdef, p)(x, mask)
    return jnp.sum(y * jnp.sin(jnp.arange(D, dtype=jnp.float32))) + aux["moe_load_balance_loss"], (y, aux)
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


@pytest.fixture(scope="module")
def single_device():
  moe = make_moe()
  x = jax.random.normal(jax.random.key(1), (8, 6, D))
  mask = jnp.arange(6)[None, :] < jnp.array([6, 6, 4, 6, 0, 6, 5, 6])[:, None]  # some padding, one empty row
  graphdef, params = nnx.split(moe)
  grad_fn = loss_fn(graphdef)
  return moe, x, mask, params, grad_fn, jax.jit(grad_fn)(params, x, mask)


def sharded_run(mesh, grad_fn, params, x, mask):
  """The step on `mesh` with the parameters sharded as the trainer shards them (experts over `expert`, embed over
  `fsdp`) and the tokens over the batch axes -> (its results, its compiled HLO)."""
  params = jax.device_put(params, sharding.param_shardings(params, mesh))
  with sharding.use_mesh(mesh):
    xs = jax.device_put(x, sharding.named_sharding(mesh, ("batch", None, None)))
    ms = jax.device_put(mask, sharding.named_sharding(mesh, ("batch", None)))
    step = jax.jit(grad_fn)
    return step(params, xs, ms), step.lower(params, xs, ms).compile().as_text()


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=4, expert=2), MeshConfig(data=2, fsdp=2, expert=2),
                                      MeshConfig(fsdp=2, expert=4)], ids=["data4-ep2", "data2-fsdp2-ep2", "fsdp2-ep4"])
def test_expert_parallel_equals_single_device(single_device, mesh_cfg):
  moe, x, mask, params, grad_fn, ((_, (y1, aux1)), g1) = single_device
  ((_, (y8, aux8)), g8), hlo = sharded_run(mesh_of(mesh_cfg), grad_fn, params, x, mask)
  assert " all-to-all(" in hlo  # the expert-parallel exchange was taken
  np.testing.assert_allclose(np.asarray(y8), np.asarray(y1), atol=1e-5, rtol=1e-5)
  for name in aux1:
    np.testing.assert_allclose(np.asarray(aux8[name]), np.asarray(aux1[name]), atol=1e-6, err_msg=name)
  assert float(aux8["moe_drop_rate"]) == 0.0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g8), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5, err_msg=str(path))


def all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
  shapes = re.findall(r"= \w+\[([\d,]*)\][^=]* all-gather(?:-start)?\(", hlo)
  return [tuple(int(n) for n in s.split(",") if n) for s in shapes]


def test_compiled_program_moves_tokens_not_expert_weights(single_device):
  """data=2 x expert=4: all-to-all in the compiled HLO, and no all-gather yields a weight of all E experts (each device
  keeps its E / 4 experts; without an fsdp axis nothing of theirs is gathered at all)."""
  moe, x, mask, params, grad_fn, _ = single_device
  _, hlo = sharded_run(mesh_of(MeshConfig(data=2, expert=4)), grad_fn, params, x, mask)
  assert hlo.count(" all-to-all(") >= 4  # tokens out and back, forward and backward
  weight_shapes = {(E, D, F), (E, F, D)}
  gathered = all_gather_shapes(hlo)
  assert not weight_shapes & set(gathered), gathered
  assert not [s for s in gathered if len(s) == 3 and s[0] in (E // 4, E) and set(s[1:]) == {D, F}], gathered


def test_bounded_slots_drop_exactly_the_overflow(single_device):
  """ep_capacity_factor 0.5 on data=2 x expert=4 (8 token shards of 6 tokens, 12 assignments each): a device sends at
  most ceil(0.5 * 12 / 4) = 2 rows to each expert device, in expert order; the layer's output equals the per-token
  reference that skips exactly those assignments, and moe_drop_rate is their share of the real assignments."""
  moe, x, mask, params, _, _ = single_device
  bounded = make_moe(ep_capacity_factor=0.5)
  nnx.update(bounded, params)
  mesh = mesh_of(MeshConfig(data=2, expert=4))
  with sharding.use_mesh(mesh):
    xs = jax.device_put(x, sharding.named_sharding(mesh, ("batch", None, None)))
    ms = jax.device_put(mask, sharding.named_sharding(mesh, ("batch", None)))
    y, aux = jax.jit(lambda x, m: bounded(x, m))(xs, ms)

  xn = np.asarray(x, np.float64).reshape(48, D)
  real = np.asarray(mask).reshape(48)
  router, gate, up, down = (np.asarray(getattr(moe, n)[...], np.float64) for n in ("router", "gate", "up", "down"))
  want, dropped, total = np.zeros_like(xn), 0, 0
  slot = 2
  for shard in range(8):  # tokens 6 * shard ... of each device, assignments in expert order
    tokens = range(6 * shard, 6 * shard + 6)
    assignments = []
    for n in tokens:
      logits = xn[n] @ router
      p = np.exp(logits - logits.max())
      p /= p.sum()
      top = np.argsort(-p, kind="stable")[:K]
      assignments += [(e, n * K + c, n, p[e] / p[top].sum()) for c, e in enumerate(top)]
    sent = np.zeros(4, int)
    for e, _, n, w in sorted(assignments, key=lambda a: (a[0], a[1])):
      dest = e // (E // 4)
      kept = sent[dest] < slot
      sent[dest] += 1
      total += real[n]
      dropped += real[n] and not kept
      if kept:
        want[n] += w * ((silu(xn[n] @ gate[e]) * (xn[n] @ up[e])) @ down[e])
  assert 0 < dropped < total
  np.testing.assert_allclose(np.asarray(y).reshape(48, D), want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(float(aux["moe_drop_rate"]), dropped / total, rtol=1e-6)


def test_experts_must_divide_over_the_expert_axis():
  moe = MoEFeedForward(D, F, MoEConfig(num_experts=6, top_k=2), dtype=jnp.float32, param_dtype=jnp.float32,
                       rngs=nnx.Rngs(0))
  with sharding.use_mesh(mesh_of(MeshConfig(data=2, expert=4))):
    with pytest.raises(ValueError, match="num_experts=6 does not divide over mesh.expert=4"):
      jax.eval_shape(lambda x: moe(x), jnp.zeros((8, 4, D)))
