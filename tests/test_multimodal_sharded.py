"""Sharded initialisation and forward of the multimodal model on a 2x2x2 (data, fsdp, tensor) mesh."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from mm15_jax import sharding
from mm15_jax.config import MeshConfig
from mm15_jax.models import multimodal as mm
from test_multimodal import IMG, batch, call, tiny_config


def test_sharded_init_and_forward_equal_unsharded():
  cfg = tiny_config(dtype="float32")
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  sharded = mm.init_sharded(cfg, mesh, seed=0)
  plain = mm.MultimodalModel(cfg, rngs=nnx.Rngs(0))
  params = nnx.state(sharded, nnx.Param)
  specs = nnx.get_partition_spec(params)
  for (path, spec), leaf, ref in zip(jax.tree_util.tree_leaves_with_path(specs), jax.tree.leaves(params),
                                     jax.tree.leaves(nnx.state(plain, nnx.Param))):
    names = tuple(spec)
    assert len(names) == leaf.ndim and all(n is None or n in sharding.LOGICAL_RULES for n in names), path
    assert isinstance(leaf.sharding, NamedSharding)
    assert leaf.sharding.spec == sharding.logical_to_spec(names), path
    np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref), rtol=1e-6, atol=1e-9)  # jit vs eager sampling
  q = sharded.decoder.units.blocks[0].attn.q[...]
  assert q.addressable_shards[0].data.size == q.size // 4  # embed over fsdp=2, heads over tensor=2

  inputs = batch()
  want, want_aux = call(plain, *inputs)
  graphdef, state = nnx.split(sharded)
  data = jax.tree.map(lambda x: jax.device_put(x, sharding.named_sharding(mesh, ("batch",) + (None,) * (x.ndim - 1))),
                      inputs)

  @jax.jit
  def fwd(state, data):
    return nnx.merge(graphdef, state)(*data, image_token_id=IMG)

  with sharding.use_mesh(mesh):
    got, got_aux = fwd(state, data)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
  for k in want_aux:
    np.testing.assert_allclose(float(got_aux[k]), float(want_aux[k]), rtol=1e-5)

  # Tiles enlarged in the model (data.split.enlarge_on_device): per-slot extents, sharded over the batch as well.
  extent = np.random.RandomState(1).randint(1, 17, (4, 3, 4)).astype(np.int32)
  extent[..., 2:] = np.maximum(extent[..., 2:], extent[..., :2])

  @jax.jit
  def fwd_extent(state, data, extent):
    return nnx.merge(graphdef, state)(*data, image_token_id=IMG, image_extent=extent)

  want_e, _ = fwd_extent(nnx.state(plain), inputs, extent)
  assert np.abs(np.asarray(want_e) - np.asarray(want)).max() > 1e-3
  with sharding.use_mesh(mesh):
    got_e, _ = fwd_extent(state, data, jax.device_put(extent, sharding.named_sharding(mesh, ("batch", None, None))))
  np.testing.assert_allclose(np.asarray(got_e), np.asarray(want_e), atol=2e-5)


def test_indivisible_axis_names_the_parameter_and_mesh_key():
  cfg = tiny_config()  # 2 key/value heads: a tensor axis of 4 cannot split them
  mesh = sharding.make_mesh(MeshConfig(data=2, tensor=4))
  abstract = nnx.state(nnx.eval_shape(lambda: mm.MultimodalModel(cfg, rngs=nnx.Rngs(0))))
  with pytest.raises(ValueError, match=r"attn/k: axis 'kv_heads' of size 2 does not divide over mesh.tensor=4"):
    sharding.param_shardings(abstract, mesh)
