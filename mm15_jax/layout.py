"""Where a run's files live under its workdir (one folder per stage): shared by training and evaluation."""
from __future__ import annotations

import os

from mm15_jax.config import StageConfig


def stage_dir(workdir: str, stage: StageConfig) -> str:
  """metrics.jsonl, tb/ and summary.json of the stage."""
  return os.path.join(workdir, stage.name)


def checkpoint_dir(workdir: str, stage: StageConfig) -> str:
  return os.path.join(stage_dir(workdir, stage), "checkpoints")


def eval_dir(workdir: str) -> str:
  """report.json, categories.png and predictions.jsonl of `mm15 eval --workdir`."""
  return os.path.join(workdir, "eval")
