"""Weights & Biases logging beside metrics.jsonl and TensorBoard (config logging.wandb; process 0 only).

One W&B run per stage, its config the resolved experiment, its history the scalars metrics.jsonl gets at the same
steps. The run's id is kept in <workdir>/<stage>/wandb_run_id, so a resumed stage continues the same W&B run
(resume="allow"). W&B keeps the first value of a step: after a resume from checkpoint step N, the steps after N that
the stopped run had already sent keep its values (resume is exact, so its losses are those of the rerun).
Local files go where W&B puts them (WANDB_DIR, else ./wandb): a workdir may be a bucket, which W&B cannot write.
"""
from __future__ import annotations

import secrets
import string

import jax
from etils import epath

from mm15_jax import config as config_lib
from mm15_jax import paths
from mm15_jax.config import Experiment, LoggingConfig, StageConfig
from mm15_jax.errors import RunError, UserError

RUN_ID_FILE = "wandb_run_id"


def enabled(cfg: LoggingConfig) -> bool:
  return bool(cfg.wandb) and cfg.wandb_mode != "disabled"


def _wandb(cfg: LoggingConfig):
  try:
    import wandb
  except ImportError as e:
    raise UserError(f"config key logging.wandb={cfg.wandb!r}: the wandb package is not installed: "
                    f"pip install -e '.[wandb]' (or set logging.wandb='' for no W&B logging)") from e
  return wandb


def require_installed(cfg: LoggingConfig) -> None:
  """UserError naming the install command when W&B logging is asked for and wandb is missing."""
  if enabled(cfg):
    _wandb(cfg)


class Run:
  """The stage's W&B run: `log(step, scalars)`, `close()`."""

  def __init__(self, run):
    self._run = run

  @property
  def id(self) -> str:
    return self._run.id

  def log(self, step: int, scalars: dict[str, float]) -> None:
    self._run.log(scalars, step=step)

  def close(self) -> None:
    self._run.finish()


def open_run(exp: Experiment, stage: StageConfig, stage_dir: str) -> Run | None:
  """The stage's W&B run (a new one, or the one its wandb_run_id names); None when off or not process 0."""
  cfg = exp.logging
  if not enabled(cfg) or jax.process_index() != 0:
    return None
  wandb = _wandb(cfg)
  id_path = epath.Path(paths.join(stage_dir, RUN_ID_FILE))
  run_id = id_path.read_text().strip() if id_path.exists() else ""
  if not run_id:
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's form
    id_path.write_text(run_id + "\n")  # before init: a run stopped during it continues under the same id
  entity, _, project = cfg.wandb.rpartition("/")
  try:
    run = wandb.init(entity=entity or None, project=project, id=run_id, resume="allow", mode=cfg.wandb_mode,
                     name=f"{exp.name}/{stage.name}", group=exp.name, job_type=stage.name,
                     config=config_lib.to_dict(exp))
  except Exception as e:  # W&B raises its own types (CommError, UsageError, ...): one line, and the way out
    raise RunError(f"config key logging.wandb={cfg.wandb!r}: W&B could not start run {run_id} "
                   f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); logging.wandb_mode=offline logs "
                   f"locally for `wandb sync`") from e
  return Run(run)
