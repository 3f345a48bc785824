"""stages.<s>.epochs: steps from the mixture's sizes and the measured samples per packed row, kept on resume."""
import os
import signal
import types

import numpy as np
import pytest

from fixtures import compilation_cache, corpus_dir, tiny_experiment, with_stage  # noqa: F401 (fixtures)
from mm15_jax import layout
from mm15_jax.config import DataConfig, StageConfig
from mm15_jax.data import pipeline as pipeline_lib
from mm15_jax.train import checkpoint as ckpt_lib
from mm15_jax.train import epochs, runner
from mm15_jax.train.logs import MetricsWriter


def _batches(per_row_lists):
  return iter([types.SimpleNamespace(stats={"samples": np.array(rows, np.int32)}) for rows in per_row_lists])


def test_arithmetic():
  assert epochs.samples_per_row(_batches([[3, 1], [2, 2]])) == (2.0, 4)
  assert epochs.mixture_samples({"a": 0.5, "b": 0.0, "c": 0.5}, {"a": [0] * 7, "b": [0] * 9, "c": [0] * 3}) == {
      "a": 7, "c": 3}
  # one epoch of 23,000 x 256 x 2.5 samples at 2.5 samples per row and 256 rows per batch: 23,000 steps
  assert epochs.steps_for(1.0, 23_000 * 640, 2.5, 256) == 23_000
  assert epochs.steps_for(1.0, 23_000 * 640 + 1, 2.5, 256) == 23_001  # a partial batch is a step
  assert epochs.steps_for(0.5, 10, 4.0, 8) == 1


def test_resolve_measures_or_takes_the_checkpoint_schedule():
  stage = StageConfig(name="sft", epochs=2.0, batch_size=4, steps=999,
                      data=DataConfig(mixture={"a": 1.0, "b": 1.0}))
  sources = {"a": [0] * 30, "b": [0] * 18}
  asked = []

  def probe(rows):
    asked.append(rows)
    return _batches([[3] * rows] * 10)

  log = []
  got, schedule = epochs.resolve(stage, sources=sources, probe=probe, log=log.append)
  assert got.steps == 8 and schedule["steps"] == 8  # 2 x 48 / (3 x 4)
  assert schedule["samples_per_row"] == 3.0 and schedule["probe_rows"] == epochs.PROBE_ROWS
  assert schedule["dataset_samples"] == {"a": 30, "b": 18} and asked == [epochs.PROBE_BATCH]
  assert "3.000 samples per packed row" in log[0] and "-> 8 steps" in log[0]
  kept, again = epochs.resolve(stage, sources={}, probe=None, saved={"schedule": {**schedule, "steps": 11}},
                               log=log.append)
  assert kept.steps == 11 and again["steps"] == 11 and "as the checkpoint resolved them" in log[-1]
  equal = StageConfig(name="ocr", epochs=1.0, batch_size=6,
                      data=DataConfig(mixture={"a": 1.0, "b": 1.0, "c": 1.0}, equal_sources=True))
  asked.clear()
  got, _ = epochs.resolve(equal, sources={"a": [0] * 4, "b": [0] * 4, "c": [0] * 4}, probe=probe, log=log.append)
  assert asked == [33] and got.steps == 1  # probe batches divisible by the 3 sources equal_sources needs
  assert epochs.resolve(StageConfig(steps=5), sources={}, probe=None) == (StageConfig(steps=5), None)
  with pytest.raises(ValueError, match=r"stages.sft.epochs=-1.0: must be > 0"):
    epochs.resolve(StageConfig(name="sft", epochs=-1.0), sources={}, probe=None)


class _StopAt(MetricsWriter):
  """SIGTERM to this process once step `stop` is logged."""
  stop = 1

  def write(self, step, scalars):
    super().write(step, scalars)
    if step == self.stop:
      os.kill(os.getpid(), signal.SIGTERM)


def test_runner_resolves_epochs_and_resume_keeps_them(corpus_dir, compilation_cache, tmp_path, monkeypatch):
  exp = tiny_experiment(corpus_dir)
  stage = exp.stages[0]
  sources = pipeline_lib.open_sources(stage.data)
  samples = sum(len(sources[n]) for n in stage.data.mixture)
  # About 3 steps: epochs chosen from the corpus size, the steps then resolved from the measured packing.
  exp = with_stage(exp, 0, epochs=3 * stage.batch_size * 2.0 / samples, steps=1000)
  workdir = str(tmp_path)
  log = []
  with monkeypatch.context() as m:
    m.setattr(runner, "MetricsWriter", _StopAt)
    with pytest.raises(SystemExit):
      runner.run_stage(exp, 0, workdir, log=log.append)
  meta = ckpt_lib.read_meta(layout.checkpoint_dir(workdir, exp.stages[0]))
  schedule = meta["schedule"]
  assert meta["step"] == 1 and meta["stage"]["steps"] == schedule["steps"] and 1 < schedule["steps"] < 1000
  assert schedule["samples"] == samples and schedule["samples_per_row"] > 1.0  # rows pack several samples
  assert schedule["steps"] == epochs.steps_for(exp.stages[0].epochs, samples, schedule["samples_per_row"],
                                               stage.batch_size)
  assert any("samples per packed row" in line for line in log)

  def no_probe(*_, **__):
    raise AssertionError("a resumed run measured again")

  monkeypatch.setattr(epochs, "samples_per_row", no_probe)
  log = []
  summary = runner.run_stage(exp, 0, workdir, log=log.append)
  assert summary["steps"] == schedule["steps"]
  assert any("as the checkpoint resolved them" in line for line in log)
  assert ckpt_lib.read_meta(layout.checkpoint_dir(workdir, exp.stages[0]))["schedule"] == schedule
