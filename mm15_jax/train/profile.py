"""A jax.profiler trace of train steps A..B-1 (profile.steps="A:B") for TensorBoard's profile plugin or XProf.

    with StepTrace((A, B), logdir, log) as trace:
      ...
      trace.before(step + 1)            # about to run that step
      state, metrics = train_step(...)
      step += 1
      trace.after(step, metrics)        # the step ran (dispatched): the trace stops after step B-1 finishes

Each process traces its own host into <logdir>/plugins/profile/<run>/<host>.xplane.pb. A run resumed inside the
window traces the steps it still runs; one stopped early (an error, SIGTERM, non-finite steps) still stops the trace
on leaving the `with`, so the file holds the steps that ran.
"""
from __future__ import annotations

from typing import Any, Callable

import jax


class StepTrace:

  def __init__(self, window: tuple[int, int] | None, logdir: str, log: Callable[[str], Any] = print):
    self.window, self.logdir, self.log = window, logdir, log
    self.active = self.done = False

  def before(self, step: int) -> None:
    """Starts the trace when `step`, about to run, is the first of the window this run reaches."""
    if self.window is None or self.active or self.done:
      return
    first, end = self.window
    if first <= step < end:
      jax.profiler.start_trace(self.logdir)
      self.active = True
      self.log(f"profile: tracing steps {step}..{end - 1} into {self.logdir}")

  def after(self, step: int, outputs: Any) -> None:
    """Stops the trace once the window's last step has run (waiting for `outputs`, its results, to be ready)."""
    if self.active and step >= self.window[1] - 1:
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self) -> None:
    if self.active:
      self.active, self.done = False, True
      jax.profiler.stop_trace()
      self.log(f"profile: trace written to {self.logdir} (tensorboard --logdir {self.logdir})")

  def __enter__(self) -> StepTrace:
    return self

  def __exit__(self, *exc) -> None:
    self.stop()  # also when the loop leaves early: the steps traced so far are written
