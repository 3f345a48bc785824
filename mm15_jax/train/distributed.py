"""Multi-host start-up: one process per host, `jax.distributed.initialize` before any other jax call.

On Cloud TPU (TPU VMs and GKE TPU nodes, one host or many) `jax.distributed.initialize()` is called without
arguments, as jax requires there: it reads the coordinator, process count and id from the TPU metadata (GKE: the
TPU_WORKER_* variables). Elsewhere (CPU processes on one machine, GPU clusters) set MM15_COORDINATOR=host:port,
MM15_NUM_PROCESSES and MM15_PROCESS_ID (launch/local.py does this). Cross-process collectives of the CPU backend go
over gloo (jax's CPU client has none unless told before it is created).
"""
from __future__ import annotations

import os
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

_initialized = False


def initialize() -> None:
  global _initialized
  if _initialized:
    return
  coordinator = os.environ.get("MM15_COORDINATOR")
  if coordinator:
    try:
      num, pid = int(os.environ["MM15_NUM_PROCESSES"]), int(os.environ["MM15_PROCESS_ID"])
    except KeyError as e:
      raise SystemExit(f"MM15_COORDINATOR is set but {e.args[0]} is not") from e
    except ValueError as e:
      raise SystemExit(f"MM15_NUM_PROCESSES / MM15_PROCESS_ID must be integers: {e}") from e
    if not 0 <= pid < num:
      raise SystemExit(f"MM15_PROCESS_ID={pid} outside 0..{num - 1} (MM15_NUM_PROCESSES={num})")
    # Only the CPU client reads this; harmless on GPU/TPU, where host-side arrays still live on the CPU client.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
  elif on_cloud_tpu():
    jax.distributed.initialize()
  _initialized = True


def on_cloud_tpu() -> bool:
  """Whether this host has TPU chips that jax will use: `import jax` found them on the PCI bus with libtpu
  installed (jax's own test, which its TPU cluster detection also requires), and JAX_PLATFORMS allows TPU."""
  from jax._src import cloud_tpu_init
  platforms = os.environ.get("JAX_PLATFORMS", "")
  return cloud_tpu_init.running_in_cloud_tpu_vm and (not platforms or "tpu" in platforms.split(","))


# Steps between cross-host agreements on preemption (multi-process runs only). Each agreement is one all-gather of
# an int32 per process, and the host waits for the steps in flight to finish (the gather queues behind them), so
# dispatch of the next step does not overlap the current one at that step: about one step's host-side work per
# check. The price of a larger value: a preempted job runs up to this many more steps before saving.
PREEMPTION_CHECK_EVERY = int(os.environ.get("MM15_PREEMPTION_CHECK_EVERY", "10"))


class Preemption:
  """SIGTERM (TPU maintenance / preemption) sets a flag; the loop saves at the current step and exits cleanly.

  With several processes, a host that saw SIGTERM must not stop alone (the others would wait forever in the next
  collective): every `check_every` steps all hosts all-gather their flags and stop together if any is set.
  """

  def __init__(self, check_every: int = PREEMPTION_CHECK_EVERY):
    if check_every < 1:
      raise ValueError(f"MM15_PREEMPTION_CHECK_EVERY must be >= 1, got {check_every}")
    self.requested = False
    self.check_every = check_every
    self._previous = None
    self._agreed: tuple[int, bool] = (-1, False)  # (step, decision) of the last agreement

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def stop_after(self, step: int) -> bool:
    """Whether to save and exit after `step`: the same answer on every host (called by all at the same steps)."""
    if jax.process_count() == 1:
      return self.requested
    if step % self.check_every:
      return False
    if self._agreed[0] != step:  # one gather per step, however often asked
      flags = multihost_utils.process_allgather(np.int32(self.requested))
      self._agreed = (step, bool(np.any(flags)))
    return self._agreed[1]

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
