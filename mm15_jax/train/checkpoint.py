"""Orbax checkpoints: parameters, optimiser state and the data iterator's position, saved together.

Layout: `<dir>/<step>/{params, opt, data, meta, SHA256SUMS.json}`. Orbax writes each step into a temporary
directory and renames it when complete, so a process killed while saving never damages an earlier checkpoint. Once a
save is complete, the SHA-256 and size of each of its files go into `SHA256SUMS.json`; a restore checks them, and a
step that fails the check or fails to restore is moved to `<dir>-damaged/` (never deleted) with one warning line,
and the step before it is used. Saves are asynchronous: the train loop blocks only while arrays are copied off the
devices; a save that fails stops the run at the next step boundary (`check`) with its root cause in one line.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import sys
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mm15_jax import errors, paths
from mm15_jax.train.step import TrainState

MANIFEST = "SHA256SUMS.json"


class CheckpointSaveError(errors.RunError):
  pass


def _file_digest(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _files(step_dir: epath.Path) -> dict[str, epath.Path]:
  """Every file under `step_dir` (but the manifest) by its path relative to it."""
  out, todo = {}, [step_dir]
  while todo:
    for p in todo.pop().iterdir():
      if p.is_dir():
        todo.append(p)
      elif p.name != MANIFEST:
        out[str(p.relative_to(step_dir))] = p
  return out


def write_manifest(step_dir) -> None:
  """SHA-256 and size of every file of a complete step, written beside them (atomically, by rename)."""
  step_dir = epath.Path(step_dir)
  sums = {name: {"size": p.stat().length, "sha256": _file_digest(p)} for name, p in sorted(_files(step_dir).items())}
  tmp = step_dir / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps({"files": sums}, indent=1))
  tmp.rename(step_dir / MANIFEST)


def verify(step_dir) -> str | None:
  """None when every file of the step matches its manifest, else what is wrong ("no manifest" for a step saved
  without one)."""
  step_dir = epath.Path(step_dir)
  try:
    want = json.loads((step_dir / MANIFEST).read_text())["files"]
  except FileNotFoundError:
    return "no manifest"
  except (ValueError, KeyError, TypeError) as e:
    return f"unreadable {MANIFEST} ({e})"
  have = _files(step_dir)
  for name, entry in want.items():
    if name not in have:
      return f"{name} is missing"
    if have[name].stat().length != entry["size"]:
      return f"{name} has {have[name].stat().length} bytes, {entry['size']} were saved"
    if _file_digest(have[name]) != entry["sha256"]:
      return f"{name} does not match its SHA-256"
  return None


def _agree(ok: bool) -> bool:
  """Whether every process says ok (one process: itself)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _broadcast_problem(problem: str | None) -> str | None:
  """Process 0's verdict, on every process (only process 0 reads the files)."""
  if jax.process_count() == 1:
    return problem
  from jax.experimental import multihost_utils
  bad = bool(multihost_utils.broadcast_one_to_all(np.int32(problem is not None)))
  return (problem or "failed its check on process 0") if bad else None


def _checked(directory: str, step: int) -> str | None:
  """What is wrong with a step (None: intact or saved without a manifest), decided by process 0."""
  problem = None
  if jax.process_index() == 0:
    problem = verify(epath.Path(directory) / str(step))
    problem = None if problem == "no manifest" else problem
  return _broadcast_problem(problem)


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _abstract(tree):
  """Arrays -> ShapeDtypeStructs with their shardings: restore lands directly on that layout (any mesh)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def pure(params) -> dict:
  return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


class Checkpointer:
  """Saves when told (the loop decides when), keeps the last `keep` (plus every `keep_period`-th when set)."""

  def __init__(self, directory: str, *, keep: int, keep_period: int | None = None, async_save: bool = True):
    self.directory = paths.absolute(directory)
    self._pending: int | None = None  # the step of the save in flight
    self._failed_step: int | None = None
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
    """Starts saving `step`; refuses a state holding NaN or Inf (the last complete checkpoint stays the newest)."""
    if not bool(jax.device_get(_all_finite(state))):
      raise errors.RunError(f"step {step}: the train state holds NaN or Inf, so it is not saved; the newest complete "
                            f"checkpoint in {self.directory} is step {self.manager.latest_step()}")
    self._finish()  # the previous save: its error, if any, and its manifest
    args = {"params": ocp.args.StandardSave(pure(state.params)),
            "opt": ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as e:  # pylint: disable=broad-except (the blocking part of the save)
      self._fail(step, e)
    if saved:
      self._pending = step
    return saved

  def check(self) -> None:
    """At a step boundary: raises CheckpointSaveError if the save in flight failed; seals (manifest) a finished one.

    One process only: with several, hosts finish their saves at different moments, so they meet at the next save.
    """
    if self._pending is not None and jax.process_count() == 1 and not self.manager.is_saving_in_progress():
      self._finish()

  def _finish(self) -> None:
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._fail(step, e)
    if jax.process_index() == 0:
      write_manifest(epath.Path(self.directory) / str(step))

  def _fail(self, step: int, exc: BaseException):
    """The failed save's temporary folder removed, one line naming the root cause."""
    self._failed_step = step
    partial = self._partial_folders(step)
    # Where the failed write names no file (e.g. one that fails at close), the step's folder is the place to look.
    where = str(partial[0] if partial else epath.Path(self.directory) / str(step))
    self._remove_partial(step)
    kept = [s for s in self.manager.all_steps() if s != step]
    kept_text = f"step {max(kept)} is the newest complete checkpoint" if kept else "no complete checkpoint is kept"
    raise CheckpointSaveError(f"checkpoint save at step {step} failed: {errors.root_cause(exc, where)}; "
                              f"{kept_text} in {self.directory}") from exc

  def _partial_folders(self, step: int) -> list[epath.Path]:
    return sorted(epath.Path(self.directory).glob(f"{step}{ocp.path.step.TMP_DIR_SUFFIX}*"))

  def _remove_partial(self, step: int) -> None:
    """Best effort while the save's other writer threads may still run; `close` repeats it once they have stopped."""
    if jax.process_index() != 0:
      return
    for tmp in self._partial_folders(step):
      try:
        tmp.rmtree()
      except OSError:  # a writer thread added a file meanwhile
        pass

  def restore_latest(self, like: TrainState, data_iter, log=print) -> tuple[int, TrainState | None, dict | None]:
    """(step, state, meta) of the newest step that passes its check and restores, else (0, None, None).

    A damaged step is moved to `<dir>-damaged/<step>.<time>` with one warning line, and the step before is tried.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      problem = _checked(self.directory, step)
      if problem is None:
        try:
          state, meta = self.restore(step, like, data_iter)
          ok = True
        except Exception as e:  # pylint: disable=broad-except (any failure means: this step cannot be used)
          problem, ok = f"does not restore: {errors.root_cause(e)}", False
        if _agree(ok):
          return step, state, meta
        problem = problem or "does not restore on another process"
      self._set_aside(step, problem, log)
    return 0, None, None

  def _set_aside(self, step: int, problem: str, log):
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = epath.Path(self.directory + "-damaged") / f"{step}.{stamp}"
    if jax.process_index() == 0:
      dest.parent.mkdir(parents=True, exist_ok=True)
      (epath.Path(self.directory) / str(step)).rename(dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"mm15 checkpoint set aside {step}")
    self.manager.reload()
    log(f"WARNING: checkpoint step {step} in {self.directory} is damaged ({problem}); moved to {dest}, "
        f"falling back to the step before")

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
    self._finish()

  def close(self):
    """Waits for the save in flight; after a failed save (already raised) only releases the manager."""
    failed = self._failed_step is not None
    try:
      if not failed:
        self._finish()
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        if not failed:
          raise
      if failed:  # the writer threads have stopped now: nothing can recreate the partial folder
        self._remove_partial(self._failed_step)


class _OpenedReadOnlyOnPurpose(logging.Filter):
  """Orbax warns "Given directory is read only" for every read-only manager: restores and listings open them on
  purpose, so the warning says nothing to the user (and came three times per restore)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_OpenedReadOnlyOnPurpose())


def _reader(directory: str, **handlers) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
  return ocp.CheckpointManager(paths.absolute(directory), item_handlers=handlers, options=options)


def _warn_damaged(directory: str, step: int, problem: str):
  print(f"WARNING: checkpoint step {step} in {directory} is damaged ({problem}); using the step before",
        file=sys.stderr, flush=True)


def newest_intact_step(directory: str) -> int:
  """The newest step of `directory` whose files match their manifest (or that has none); damaged ones are reported,
  not moved (the directory may belong to another stage or run)."""
  if not epath.Path(directory).is_dir():
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
  manager = _reader(directory, meta=ocp.JsonCheckpointHandler())
  steps = sorted(manager.all_steps(), reverse=True)
  manager.close()
  for step in steps:
    problem = _checked(paths.absolute(directory), step)
    missing = [item for item in ("meta", "params") if not (epath.Path(directory) / str(step) / item).is_dir()]
    problem = problem or (f"no {missing[0]} folder" if missing else None)  # checked when it has no manifest
    if problem is None:
      return step
    _warn_damaged(directory, step, problem)
  raise FileNotFoundError(f"no complete checkpoint in {directory}")


def _restore_item(directory: str, name: str, handler, args, step: int | None):
  """Item `name` of `step`, or of the newest step that passes its check and restores (others are reported and
  skipped, not moved: this directory may belong to another stage or run)."""
  if not epath.Path(directory).is_dir():
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
  manager = _reader(directory, **{name: handler})
  try:
    steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    for candidate in steps:
      problem = _checked(paths.absolute(directory), candidate)
      if problem is None:
        try:
          return manager.restore(candidate, args=ocp.args.Composite(**{name: args}))[name]
        except Exception as e:  # pylint: disable=broad-except
          if step is not None:
            raise errors.UserError(f"checkpoint step {candidate} in {directory} does not restore: "
                                   f"{errors.root_cause(e)}") from e
          problem = f"does not restore: {errors.root_cause(e)}"
      elif step is not None:
        raise errors.UserError(f"checkpoint step {candidate} in {directory} is damaged ({problem})")
      _warn_damaged(directory, candidate, problem)
    raise FileNotFoundError(f"no complete checkpoint in {directory}")
  finally:
    manager.close()


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
  if jax.process_index() == 0:
    write_manifest(epath.Path(directory) / str(step))
