"""Metrics out: a JSONL log, TensorBoard event files, optionally W&B (wandb_log.py) and a progress line, written by
process 0 only."""
from __future__ import annotations

import json
import sys
import time

import jax
import numpy as np
from etils import epath

from mm15_jax import paths


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsWriter:
  """`write(step, scalars)` to `<logdir>/metrics.jsonl`, TensorBoard under `<logdir>/tb` and `wandb_run` (a
  wandb_log.Run, closed with the writer) when given.

  `resume_step`: a run resumed from that checkpoint step drops what an earlier run logged after it (rows of the
  JSONL; in TensorBoard, a purge event that makes it discard those steps), so no step appears twice.
  """

  def __init__(self, logdir: str, *, prefix: str = "", resume_step: int | None = None, wandb_run=None):
    self.active = jax.process_index() == 0
    self.prefix = prefix
    self._tb = None
    self._jsonl = None
    self._wandb = wandb_run
    if self.active:
      from tensorboardX import SummaryWriter
      path = paths.join(logdir, "metrics.jsonl")
      if resume_step is not None:
        _truncate_jsonl(path, resume_step)
      self._jsonl = paths.LineLog(path)
      # tensorboardX writes gs:// and s3:// itself; purge_step hides the events past a resumed step.
      self._tb = SummaryWriter(paths.join(logdir, "tb"),
                               purge_step=resume_step + 1 if resume_step is not None else None)

  def write(self, step: int, scalars: dict[str, float]):
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, **scalars}))
    for k, v in scalars.items():
      self._tb.add_scalar(self.prefix + k, v, step)
    if self._wandb is not None:
      self._wandb.log(step, scalars)  # the JSONL's keys

  def close(self):
    if self.active:
      self._tb.close()
      self._jsonl.close()
    if self._wandb is not None:
      self._wandb.close()


def _truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps the rows of steps <= last_step (and a torn last line is dropped), rewritten by rename."""
  p = epath.Path(path)
  if not p.exists():
    return
  kept = []
  for line in p.read_text().splitlines():
    try:
      if json.loads(line)["step"] <= last_step:
        kept.append(line + "\n")
    except (ValueError, KeyError, TypeError):
      continue
  tmp = epath.Path(path + ".tmp")
  tmp.write_text("".join(kept))
  tmp.replace(p)


class Progress:
  """One line per report: step, loss, steps/s, tokens/s, ETA."""

  def __init__(self, name: str, total_steps: int, start_step: int = 0, stream=sys.stdout):
    self.name, self.total, self.stream = name, total_steps, stream
    self.active = jax.process_index() == 0
    self._t0, self._s0 = time.perf_counter(), start_step
    self._tl, self._sl = self._t0, start_step

  def rate(self, step: int) -> float:
    """Steps/s since the previous call (excluding the first, compile-bearing, step when possible)."""
    now = time.perf_counter()
    rate = (step - self._sl) / max(now - self._tl, 1e-9)
    self._tl, self._sl = now, step
    return rate

  def report(self, step: int, steps_per_s: float, scalars: dict[str, float]):
    if not self.active:
      return
    shown = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
    if step == self._s0 + 1:  # the first step carries the compile: its rate says nothing about the rest
      timing = f"compiled and ran the first step in {_fmt_duration(1 / max(steps_per_s, 1e-9))}"
    else:
      eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("nan")
      timing = f"{steps_per_s:.2f} steps/s | ETA {_fmt_duration(eta) if np.isfinite(eta) else '?'}"
    print(f"[{self.name}] step {step}/{self.total} {shown} | {timing}", file=self.stream, flush=True)
