"""The stage runner on the synthetic corpus: resume = straight run, determinism, stage transition, SIGTERM,
non-finite steps."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixtures import compilation_cache, corpus_dir, flat, tiny_experiment, with_stage  # noqa: F401 (fixtures)
from mm15_jax import layout, sharding
from mm15_jax.data.tokenizer import Tokenizer
from mm15_jax.models import vit
from mm15_jax.train import checkpoint as ckpt_lib
from mm15_jax.train import runner
from mm15_jax.train import stage as stage_lib
from mm15_jax.train import state as state_lib
from mm15_jax.train.logs import MetricsWriter

N = 2  # the resume test stops after N of 2N steps


def quiet(*_):
  pass


def losses(workdir, exp, index=0) -> dict[int, float]:
  """{step: loss} from the stage's metrics.jsonl (log_every=1); a step logged twice must agree."""
  out = {}
  with open(os.path.join(layout.stage_dir(workdir, exp.stages[index]), "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      assert out.setdefault(record["step"], record["loss"]) == record["loss"]
  return out


def final_params(workdir, exp, index=0) -> dict[str, np.ndarray]:
  mesh = sharding.make_mesh(exp.mesh)
  _, _, params, _ = state_lib.restore_model_params(layout.checkpoint_dir(workdir, exp.stages[index]), mesh)
  return flat(params)


def assert_same_params(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def exp(corpus_dir):
  return tiny_experiment(corpus_dir, steps=2 * N)


@pytest.fixture(scope="module")
def straight(exp, tmp_path_factory):
  """A fresh run of the 2N steps of stage 1."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  summary = runner.run_stage(exp, 0, workdir, log=quiet)
  return workdir, summary


def test_straight_run(straight, exp):
  workdir, summary = straight
  got = losses(workdir, exp)
  assert sorted(got) == list(range(1, 2 * N + 1))
  assert all(np.isfinite(v) for v in got.values())
  assert summary["loss_first"] == got[1] and summary["loss_last"] == got[2 * N]
  assert ckpt_lib.Checkpointer(layout.checkpoint_dir(workdir, exp.stages[0]), keep=1).latest_step() == 2 * N
  with open(os.path.join(layout.stage_dir(workdir, exp.stages[0]), "metrics.jsonl")) as f:
    first = json.loads(f.readline())
  assert first["loss_tokens"] > 0 and first["nonfinite"] == 0
  assert {"loss/caption", "loss/text"} <= first.keys()  # per-source losses of the stage's mixture


class _PreemptAfter(MetricsWriter):
  """Sends this process SIGTERM once step `stop` is logged (deterministic preemption)."""
  stop = N

  def write(self, step, scalars):
    super().write(step, scalars)
    if step == self.stop:
      os.kill(os.getpid(), signal.SIGTERM)


def test_resume_equals_straight_run(straight, exp, tmp_path, monkeypatch):
  workdir = str(tmp_path)
  with monkeypatch.context() as m:
    m.setattr(runner, "MetricsWriter", _PreemptAfter)
    with pytest.raises(SystemExit) as exit_info:
      runner.run_stage(exp, 0, workdir, log=quiet)
  assert exit_info.value.code == 143
  assert ckpt_lib.read_meta(layout.checkpoint_dir(workdir, exp.stages[0]))["step"] == N
  assert sorted(losses(workdir, exp)) == list(range(1, N + 1))

  log = []
  runner.run_stage(exp, 0, workdir, log=log.append)  # a fresh call resumes from the checkpoint
  assert any(f"resumed from step {N}" in line for line in log)
  assert losses(workdir, exp) == losses(straight[0], exp)  # exactly: same data, same state, same program
  assert_same_params(final_params(workdir, exp), final_params(straight[0], exp))


def test_two_fresh_runs_are_identical(straight, exp, tmp_path):
  workdir = str(tmp_path)
  runner.run_stage(exp, 0, workdir, log=quiet)
  assert losses(workdir, exp) == losses(straight[0], exp)
  assert_same_params(final_params(workdir, exp), final_params(straight[0], exp))


def test_stage_transition_resizes_position_embeddings(straight, exp):
  workdir, _ = straight
  ocr = exp.stages[1]
  assert ocr.init_from == "previous" and ocr.image_size == 2 * exp.stages[0].image_size
  model_cfg = stage_lib.stage_model_config(exp.model, ocr, Tokenizer(ocr.data.tokenizer).vocab_size)
  mesh = sharding.make_mesh(exp.mesh)
  _, params, _ = runner.initial_params(exp, 1, workdir, model_cfg, mesh, quiet)
  stage1, stage2 = final_params(workdir, exp), flat(params)
  assert stage1.keys() == stage2.keys()

  side1 = exp.stages[0].image_size // exp.model.vision.patch_size
  side2 = ocr.image_size // exp.model.vision.patch_size
  width = exp.model.vision.width  # both are added to ViT patch tokens
  resized = {"vision/pos_embedding": (1 + side1 ** 2, 1 + side2 ** 2, width, True),
             "connector/pos_embedding": (side1 ** 2, side2 ** 2, width, False)}
  for k, (n1, n2, d, cls) in resized.items():
    assert stage1[k].shape == (n1, d) and stage2[k].shape == (n2, d), k
    want = vit.resize_position_embedding(jnp.asarray(stage1[k]), side2, has_class_token=cls)
    np.testing.assert_allclose(stage2[k], np.asarray(want), rtol=1e-6, atol=1e-7, err_msg=k)
  np.testing.assert_array_equal(stage2["vision/pos_embedding"][0], stage1["vision/pos_embedding"][0])  # class token
  for k in stage1.keys() - resized.keys():
    np.testing.assert_array_equal(stage2[k], stage1[k], err_msg=k)
  # The parameters land on this stage's shardings.
  want_shardings = sharding.param_shardings(params, mesh)
  assert jax.tree.map(lambda x: x.sharding, params) == want_shardings


# The stage of `exp` in a fresh process; after logging step 1 it waits (up to a minute) for the SIGTERM, so the
# step it reaches does not depend on how fast the machine is.
SIGTERM_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from fixtures import tiny_experiment
    from mm15_jax.train import distributed, logs, runner

    received = []
    handle = distributed.Preemption._handle
    distributed.Preemption._handle = lambda self, *a: (received.append(1), handle(self, *a))

    class WaitAfterFirstStep(logs.MetricsWriter):
      def write(self, step, scalars):
        super().write(step, scalars)
        deadline = time.monotonic() + 60
        while step == 1 and not received and time.monotonic() < deadline:
          time.sleep(0.01)

    runner.MetricsWriter = WaitAfterFirstStep
    runner.run_stage(tiny_experiment({data!r}, steps={steps}), 0, {workdir!r})
""")


def test_sigterm_saves_and_exits_143_then_resumes(straight, exp, corpus_dir, compilation_cache, tmp_path):
  workdir = str(tmp_path / "work")
  script = tmp_path / "stage.py"
  script.write_text(SIGTERM_SCRIPT.format(tests=os.path.dirname(__file__), data=corpus_dir,
                                          steps=exp.stages[0].steps, workdir=workdir))
  # The same compilation cache: the child runs the very programs this process compiled for `straight`.
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=compilation_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  metrics = os.path.join(layout.stage_dir(workdir, exp.stages[0]), "metrics.jsonl")
  with open(tmp_path / "out.log", "w") as out:
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 120
      while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):  # its first step is done
        assert proc.poll() is None, (tmp_path / "out.log").read_text()
        assert time.monotonic() < deadline, "no step within 120 s"
        time.sleep(0.05)
      proc.send_signal(signal.SIGTERM)
      code = proc.wait(timeout=120)
    finally:
      if proc.poll() is None:
        proc.kill()
  output = (tmp_path / "out.log").read_text()
  assert code == 143, output
  assert "SIGTERM: saved step 1, exiting" in output, output
  assert ckpt_lib.read_meta(layout.checkpoint_dir(workdir, exp.stages[0]))["step"] == 1
  assert sorted(losses(workdir, exp)) == [1]

  log = []
  runner.run_stage(exp, 0, workdir, log=log.append)
  assert any("resumed from step 1" in line for line in log)
  assert losses(workdir, exp) == losses(straight[0], exp)
  assert_same_params(final_params(workdir, exp), final_params(straight[0], exp))


def test_nonfinite_steps_raise_naming_the_config_key(straight, exp, tmp_path, monkeypatch):
  real = runner.initial_params

  def poisoned(*args, **kwargs):
    graphdef, params, rest = real(*args, **kwargs)
    scale = params["decoder"]["final_norm"]["scale"]
    scale.value = jnp.full_like(scale[...], jnp.nan)
    return graphdef, params, rest

  monkeypatch.setattr(runner, "initial_params", poisoned)
  exp = with_stage(exp, 0, max_nonfinite_steps=2, steps=4)
  with pytest.raises(runner.NonFiniteError, match=r"stages\.pretrain\.max_nonfinite_steps"):
    runner.run_stage(exp, 0, str(tmp_path), log=quiet)
  records = [json.loads(line) for line in open(os.path.join(tmp_path, "pretrain", "metrics.jsonl"))]
  assert [r["step"] for r in records] == [1] and records[0]["nonfinite"] == 1  # raised at the 2nd bad step
  assert ckpt_lib.Checkpointer(layout.checkpoint_dir(str(tmp_path), exp.stages[0]), keep=1).latest_step() is None
