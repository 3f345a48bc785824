"""Where a run's files live under its workdir (one folder per stage): shared by training and evaluation."""
from __future__ import annotations

from mm15_jax import paths
from mm15_jax.config import StageConfig


def stage_dir(workdir: str, stage: StageConfig) -> str:
  """metrics.jsonl, tb/ and summary.json of the stage."""
  return paths.join(workdir, stage.name)


def checkpoint_dir(workdir: str, stage: StageConfig) -> str:
  return paths.join(stage_dir(workdir, stage), "checkpoints")


def eval_dir(workdir: str) -> str:
  """report.json, categories.png and predictions.jsonl of `mm15 eval --workdir`."""
  return paths.join(workdir, "eval")


def profile_dir(workdir: str, stage: StageConfig) -> str:
  """The stage's jax.profiler traces (profile.steps), as `tensorboard --logdir` reads them: plugins/profile/<run>/."""
  return paths.join(stage_dir(workdir, stage), "profile")
