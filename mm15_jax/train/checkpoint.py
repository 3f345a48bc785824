"""Orbax checkpoints: parameters, optimiser state and the data iterator's position, saved together.

Layout: `<dir>/<step>/{params, opt, data, meta}`. Orbax writes each step into a temporary directory and renames it
when complete, so a process killed while saving never damages an earlier checkpoint; on restart the newest
*complete* step is found by `latest_step`. Saves are asynchronous: the train loop blocks only while arrays are
copied off the devices.
"""
from __future__ import annotations

from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from mm15_jax import paths
from mm15_jax.train.step import TrainState


def _abstract(tree):
  """Arrays -> ShapeDtypeStructs with their shardings: restore lands directly on that layout (any mesh)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def pure(params) -> dict:
  return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


class Checkpointer:
  """Saves when told (the loop decides when), keeps the last `keep` (plus every `keep_period`-th when set)."""

  def __init__(self, directory: str, *, keep: int, keep_period: int | None = None, async_save: bool = True):
    self.directory = paths.absolute(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period,
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_iter, meta: dict[str, Any]) -> bool:
    args = {"params": ocp.args.StandardSave(pure(state.params)),
            "opt": ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, like: TrainState, data_iter) -> tuple[TrainState, dict]:
    """Restores onto the shardings of `like` (which may come from a different mesh than the one that saved)."""
    args = {"params": ocp.args.StandardRestore(_abstract(pure(like.params))),
            "opt": ocp.args.StandardRestore(_abstract({"step": like.step, "opt_state": like.opt_state})),
            "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    params = like.params
    if isinstance(params, nnx.State):
      nnx.replace_by_pure_dict(params, out["params"])
    else:
      params = out["params"]
    return TrainState(step=out["opt"]["step"], params=params, opt_state=out["opt"]["opt_state"]), out["meta"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _reader(directory: str, **handlers) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
  return ocp.CheckpointManager(paths.absolute(directory), item_handlers=handlers, options=options)


def _restore_item(directory: str, name: str, handler, args, step: int | None):
  manager = _reader(directory, **{name: handler})
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {directory}")
  out = manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]
  manager.close()
  return out


def restore_params(directory: str, like_params, step: int | None = None):
  """Only the parameters of a checkpoint (a stage's start, or an imported model), onto `like_params`' shardings."""
  return _restore_item(directory, "params", ocp.StandardCheckpointHandler(),
                       ocp.args.StandardRestore(_abstract(pure(like_params))), step)


def read_meta(directory: str, step: int | None = None) -> dict:
  """The JSON metadata (model config, stage, step) of a checkpoint, without touching its arrays."""
  return _restore_item(directory, "meta", ocp.JsonCheckpointHandler(), ocp.args.JsonRestore(), step)


def save_params(directory: str, params, meta: dict[str, Any], step: int = 0) -> None:
  """Parameters and meta only, as `<directory>/<step>/{params, meta}` (an imported model that a stage initialises
  from): readable by restore_params / read_meta. Refuses a directory that already holds a checkpoint."""
  directory = paths.absolute(directory)
  # Each replicated shard is written by one replica: replica-parallel writes would compile a slicing program per
  # parameter, which costs more than it saves in a one-off write.
  arrays = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)))
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  manager = ocp.CheckpointManager(directory, options=options, item_handlers={
      "params": ocp.PyTreeCheckpointHandler(type_handler_registry=arrays), "meta": ocp.JsonCheckpointHandler()})
  if manager.latest_step() is not None:
    manager.close()
    raise FileExistsError(f"{directory} already holds a checkpoint (step {manager.latest_step()}); choose a new --out")
  manager.save(step, args=ocp.args.Composite(params=ocp.args.PyTreeSave(pure(params)), meta=ocp.args.JsonSave(meta)))
  manager.wait_until_finished()
  manager.close()
