"""Multi-host training on one machine: launch/local.py starts 2 processes x 4 CPU devices (gloo collectives).

The reference is one process x 8 devices reading both hosts' data shards (`run_stage(..., data_hosts=2)`), i.e. the
same global batches: per-step losses must agree. The 2-process run is preempted on ONE host (SIGTERM to process 1
only, after step 1): both hosts must stop together at the next agreement step (3), save it and exit 143.
"""
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fixtures import compilation_cache, corpus_dir, tiny_experiment  # noqa: F401 (fixtures)
from mm15_jax import layout
from mm15_jax.train import checkpoint as ckpt_lib
from mm15_jax.train import runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launch", "local.py")
STEPS = 4

# One host of the stage; the process named by SIGTERM_PROCESS sends itself SIGTERM once step 1 is logged.
HOST_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from mm15_jax.train import distributed
    distributed.initialize()
    import jax
    from fixtures import tiny_experiment
    from mm15_jax.train import logs, runner

    class SigtermOneHost(logs.MetricsWriter):
      def write(self, step, scalars):
        super().write(step, scalars)
        if step == 1 and str(jax.process_index()) == os.environ.get("SIGTERM_PROCESS"):
          os.kill(os.getpid(), signal.SIGTERM)

    runner.MetricsWriter = SigtermOneHost
    print("devices", jax.process_count(), jax.local_device_count(), jax.device_count(), flush=True)
    runner.run_stage(tiny_experiment({data!r}, steps={steps}), 0, {workdir!r})
""")


def losses(workdir, exp) -> dict[int, float]:
  out = {}
  with open(os.path.join(layout.stage_dir(workdir, exp.stages[0]), "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      assert out.setdefault(record["step"], record["loss"]) == record["loss"]
  return out


def launch(script, env, timeout=150) -> tuple[int, str]:
  proc = subprocess.run([sys.executable, LAUNCHER, "--processes", "2", "--devices-per-process", "4", "--",
                         sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        timeout=timeout)
  return proc.returncode, proc.stdout.decode(errors="replace")


def test_two_processes_match_one_process_and_stop_together(corpus_dir, compilation_cache, tmp_path):
  exp = tiny_experiment(corpus_dir, steps=STEPS)
  reference = str(tmp_path / "reference")
  runner.run_stage(exp, 0, reference, log=lambda *_: None, data_hosts=2)

  workdir = str(tmp_path / "work")
  script = tmp_path / "host.py"
  script.write_text(HOST_SCRIPT.format(tests=os.path.dirname(__file__), data=corpus_dir, steps=STEPS,
                                       workdir=workdir))
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compilation_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", MM15_PREEMPTION_CHECK_EVERY="3", SIGTERM_PROCESS="1")
  code, output = launch(script, env)
  assert code == 143, output
  assert "[p0] devices 2 4 8" in output and "[p1] devices 2 4 8" in output, output
  for p in (0, 1):  # process 0 never saw a signal, yet stops with process 1 at the first agreement after it
    assert f"[p{p}] [pretrain] SIGTERM: saved step 3, exiting" in output, output
  assert ckpt_lib.read_meta(layout.checkpoint_dir(workdir, exp.stages[0]))["step"] == 3

  got, want = losses(workdir, exp), losses(reference, exp)
  assert sorted(got) == [1, 2, 3] and sorted(want) == list(range(1, STEPS + 1))
  # Same program on the same 8-device mesh and the same global batches; only the cross-process reductions go over
  # gloo instead of in-process, which may add the float32 partial sums in another order (a few ulps, ~1e-7).
  np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [want[s] for s in (1, 2, 3)], rtol=1e-6)


def test_launcher_stops_every_process_when_one_fails(tmp_path):
  code = ("import os, sys, time\n"
          "if os.environ['MM15_PROCESS_ID'] == '1': print('failing', flush=True); sys.exit(3)\n"
          "time.sleep(60)\n")
  start = time.monotonic()
  proc = subprocess.run([sys.executable, LAUNCHER, "-n", "2", "--", sys.executable, "-c", code],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
  output = proc.stdout.decode()
  assert proc.returncode == 3, output
  assert "[p1] failing" in output and "process 1 exited with status 3" in output, output
  assert time.monotonic() - start < 30  # process 0 was killed, not waited for


def test_launcher_dry_run_prints_commands_and_environment():
  proc = subprocess.run([sys.executable, LAUNCHER, "--dry-run", "--processes", "3", "--devices-per-process", "2",
                         "--port", "4567", "--", "python", "-m", "mm15_jax.cli", "train", "--config", "tiny"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, XLA_FLAGS="--foo"),
                        timeout=30)
  assert proc.returncode == 0, proc.stderr.decode()
  lines = proc.stdout.decode().splitlines()
  assert lines == [
      f"[p{i}] MM15_COORDINATOR=127.0.0.1:4567 MM15_NUM_PROCESSES=3 MM15_PROCESS_ID={i} JAX_PLATFORMS=cpu "
      f"XLA_FLAGS='--foo --xla_force_host_platform_device_count=2' python -m mm15_jax.cli train --config tiny"
      for i in range(3)]
