"""The sharded train state: built directly on the mesh (never a full copy on one device)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mm15_jax import sharding
from mm15_jax.config import ModelConfig
from mm15_jax.models import multimodal
from mm15_jax.models.multimodal import MultimodalModel
from mm15_jax.train import optim
from mm15_jax.train.step import TrainState


def abstract_model(cfg: ModelConfig, seed: int = 0):
  """(graphdef, abstract params, abstract rest) without allocating any weight."""
  model = nnx.eval_shape(lambda: MultimodalModel(cfg, rngs=nnx.Rngs(seed)))
  return nnx.split(model, nnx.Param, ...)


def sharded_abstract(tree, shardings):
  """ShapeDtypeStructs carrying their target shardings (what restores and AOT compiles take)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def check_shapes(expected, got, where: str) -> None:
  """Every parameter of `got` has the shape `expected` has for it; the first mismatch is an error naming it."""
  want = dict(nnx.to_flat_state(expected))
  have = dict(nnx.to_flat_state(got))
  for path in sorted(set(want) | set(have), key=str):
    a, b = want.get(path), have.get(path)
    if a is None or b is None or a.get_value().shape != b.get_value().shape:
      name = "/".join(map(str, path))
      raise ValueError(f"{where}: parameter {name} has shape {None if b is None else b.get_value().shape}, this "
                       f"stage's model needs {None if a is None else a.get_value().shape} (different model config?)")


def sharded_abstract_model(cfg: ModelConfig, mesh: Mesh, seed: int = 0):
  """(graphdef, params as ShapeDtypeStructs carrying their shardings, non-Param state as zeros): the target of a
  restore or an AOT compile; no weight is allocated."""
  graphdef, params, rest = abstract_model(cfg, seed)
  params = sharded_abstract(params, sharding.param_shardings(params, mesh))
  return graphdef, params, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), rest)


def restore_model_params(directory: str, mesh: Mesh, seed: int = 0):
  """(model config, graphdef, params, rest) of a checkpoint, parameters restored straight into their shards."""
  from mm15_jax import config as config_lib
  from mm15_jax.train import checkpoint as ckpt_lib
  step = ckpt_lib.newest_intact_step(directory)  # meta and params of one step
  meta = ckpt_lib.read_meta(directory, step)
  model_cfg = config_lib.from_dict(ModelConfig, meta["model"])
  graphdef, like, rest = sharded_abstract_model(model_cfg, mesh, seed)
  nnx.replace_by_pure_dict(like, ckpt_lib.restore_params(directory, like, step))
  return model_cfg, graphdef, like, rest


def init_params(cfg: ModelConfig, mesh: Mesh, seed: int):
  """Random initialisation compiled with output shardings: each device builds only its shard."""
  return nnx.split(multimodal.init_sharded(cfg, mesh, seed), nnx.Param, ...)


def opt_state_shardings(tx: optax.GradientTransformation, params, mesh: Mesh):
  """Shardings of `tx.init(params)` that follow the parameters: a full-shape moment takes its parameter's sharding,
  a factored row/column moment takes it less the reduced axis, counters and placeholders are replicated.

  Compiling init with these as out_shardings is what keeps AdaFactor's state sharded: left to propagation, XLA
  replicated it on every device.
  """
  views = optim.adafactor_views(params)

  def leaf_sharding(path, leaf):
    index, field = path[-1], path[-2] if len(path) > 1 else None
    if not isinstance(index, jax.tree_util.SequenceKey):
      return sharding.replicated(mesh)
    names, shape = views[index.idx]
    field = getattr(field, "name", None)
    if leaf.shape == shape:
      return NamedSharding(mesh, sharding.logical_to_spec(names))
    dims = optim.factored_dims(shape)
    if field in ("v_row", "v_col") and dims is not None:
      dropped = dims[1] if field == "v_row" else dims[0]
      kept = tuple(n for i, n in enumerate(names) if i != dropped)
      if leaf.shape == tuple(s for i, s in enumerate(shape) if i != dropped):
        return NamedSharding(mesh, sharding.logical_to_spec(kept))
      raise ValueError(f"optimiser state {optim.path_str(path)}: shape {leaf.shape} is not {shape} less axis "
                       f"{dropped}; optax's AdaFactor state layout changed")
    if leaf.size > 1:
      raise ValueError(f"optimiser state {optim.path_str(path)} of shape {leaf.shape} follows no rule for a "
                       f"parameter of shape {shape}")
    return sharding.replicated(mesh)

  return jax.tree_util.tree_map_with_path(leaf_sharding, jax.eval_shape(tx.init, params))


def init_opt_state(tx: optax.GradientTransformation, params, mesh: Mesh):
  """Optimiser state built in its shards (see opt_state_shardings)."""
  with sharding.use_mesh(mesh):
    return jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, mesh))(params)


def abstract_train_state(params, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """The train state's shapes and shardings without computing it (abstract `params` with shardings): the target of
  a resume, so a restarted job never initialises weights it is about to overwrite."""
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
  opt_state = sharded_abstract(jax.eval_shape(tx.init, params), opt_state_shardings(tx, params, mesh))
  return TrainState(step=step, params=params, opt_state=opt_state)


def new_train_state(params, tx, mesh: Mesh) -> TrainState:
  step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
  return TrainState(step=step, params=params, opt_state=init_opt_state(tx, params, mesh))


def state_shardings(state: TrainState):
  return jax.tree.map(lambda x: x.sharding, state)
