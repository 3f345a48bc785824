"""A stage's length in epochs of its mixture (`stages.<s>.epochs`), resolved into steps at start.

A step's batch is `batch_size` packed rows of `seq_len` tokens, each row holding several samples, so

  steps = ceil(epochs x samples in the mixture's datasets / (samples per packed row x batch_size)).

"Samples in the mixture's datasets" is the sum of the sizes of the sources with a positive weight: the weights set
the mix inside a batch, the sizes the length of an epoch. Samples per row is measured at start on PROBE_ROWS rows
packed by the stage's own pipeline, as process 0 of 1 reads it (in-process, same seed), so every host computes the
same steps. The resolved steps and what they came from are stored in the checkpoint metadata ("schedule"); a
resumed run takes them from there, so its learning-rate schedule and its end are those of the run it continues.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from mm15_jax.config import StageConfig

PROBE_ROWS = 128   # rows packed to measure samples per row
PROBE_BATCH = 32   # rows per probe batch


def mixture_samples(mixture: Mapping[str, float], sources: Mapping[str, Sequence]) -> dict[str, int]:
  """Samples of each source with a positive weight."""
  return {name: len(sources[name]) for name in sorted(mixture) if mixture[name] > 0}


def samples_per_row(batches: Iterator[dict]) -> tuple[float, int]:
  """(mean samples per packed row, rows seen) over `batches` (their stats["samples"] [B])."""
  samples = rows = 0
  for batch in batches:
    per_row = np.asarray(batch.stats["samples"])
    samples += int(per_row.sum())
    rows += per_row.size
  if not samples:
    raise ValueError("epochs: the probe batches hold no samples")
  return samples / rows, rows


def steps_for(epochs: float, samples: int, per_row: float, batch_size: int) -> int:
  return max(1, math.ceil(epochs * samples / (per_row * batch_size)))


def resolve(stage: StageConfig, *, sources: Mapping[str, Sequence], probe: Callable[[int], Iterator[dict]],
            saved: dict | None = None, log=print) -> tuple[StageConfig, dict | None]:
  """(the stage with `steps` set from `epochs`, the schedule record for the checkpoint); the stage as is, None, when
  epochs is 0. `probe(rows)`: an iterator of the stage's batches of `rows` rows. `saved`: the metadata of the
  checkpoint a run resumes from (its "schedule" wins)."""
  if not stage.epochs:
    return stage, None
  if not stage.epochs > 0:
    raise ValueError(f"config key stages.{stage.name}.epochs={stage.epochs}: must be > 0 (0: use steps)")
  if saved and "schedule" in saved:
    schedule = saved["schedule"]
    log(f"[{stage.name}] epochs {schedule['epochs']:g}: {schedule['steps']} steps, as the checkpoint resolved them")
    return dataclasses.replace(stage, steps=int(schedule["steps"])), schedule
  counts = mixture_samples(stage.data.mixture, sources)
  total = sum(counts.values())
  batch = PROBE_BATCH
  if stage.data.equal_sources:  # every batch holds each source equally: a multiple of the source count
    batch = math.ceil(PROBE_BATCH / len(stage.data.mixture)) * len(stage.data.mixture)
  per_row, rows = samples_per_row(itertools.islice(probe(batch), math.ceil(PROBE_ROWS / batch)))
  steps = steps_for(stage.epochs, total, per_row, stage.batch_size)
  schedule = {"epochs": stage.epochs, "dataset_samples": counts, "samples": total, "samples_per_row": per_row,
              "probe_rows": rows, "batch_size": stage.batch_size, "steps": steps}
  log(f"[{stage.name}] epochs {stage.epochs:g}: {total} samples in {len(counts)} datasets, {per_row:.3f} samples "
      f"per packed row (measured on {rows} rows), batch {stage.batch_size} rows (~{per_row * stage.batch_size:.0f} "
      f"samples) -> {steps} steps")
  return dataclasses.replace(stage, steps=steps), schedule
