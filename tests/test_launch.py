"""The TPU launchers: their --dry-run output (the exact gcloud / xpk / docker commands; nothing runs, no network),
the scripts they run on the workers (executed here by bash, against a stand-in `mm15`), the copy's exclusions and
the Cloud TPU branch of `distributed.initialize`."""
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ARGS = ["--config", "mm15", "--arg", "size=3b", "--arg", "data_dir=gs://bkt/data", "--workdir",
              "gs://bkt/runs/3b"]
SCOPE = ["--zone", "us-east5-a", "--project", "p"]
VM = ["--name", "mm15-3b", *SCOPE, "--accelerator-type", "v5p-128", "--version", "v2-alpha-tpuv5"]
VENV = ("python3 -m pip install --user --quiet --upgrade uv && python3 -m uv venv --python 3.11 --allow-existing "
        "mm15_venv && python3 -m uv pip install --python mm15_venv/bin/python ")
EXCLUDES = ["--exclude=.git", "--exclude=./runs", "--exclude=./workdir", "--exclude=.venv*", "--exclude=venv",
            "--exclude=__pycache__", "--exclude=*.egg-info", "--exclude=.pytest_cache"]


def launcher(script: str, *args: str) -> subprocess.CompletedProcess:
  """PATH is emptied so a real gcloud / xpk / docker could not start."""
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args], capture_output=True,
                        text=True, env={**os.environ, "PATH": "/nonexistent"})


def dry_run(script: str, *args: str) -> list[list[str]]:
  """The printed commands, split as a shell would."""
  out = launcher(script, "--dry-run", *args)
  if out.returncode:
    raise SystemExit(out.stderr)
  return [shlex.split(line) for line in out.stdout.splitlines()]


def remote(cmd: list[str]) -> str:
  return cmd[cmd.index("--command") + 1]


def train_remote(args: list[str], mm15: str = "mm15_venv/bin/mm15", env: str = "") -> str:
  job = shlex.join([mm15, "train", *args]) + "; echo $? > mm15_run/train.exit"
  return ('cd "$HOME" && mkdir -p mm15_run && if [ -f mm15_run/train.pid ]; then p=$(cat mm15_run/train.pid); '
          "kill -TERM -- -$p 2>/dev/null && for i in $(seq 60); do kill -0 -- -$p 2>/dev/null || break; sleep 1; "
          "done; kill -KILL -- -$p 2>/dev/null; fi; rm -f /tmp/libtpu_lockfile mm15_run/train.exit; "
          f"{env}setsid nohup bash -c {shlex.quote(job)} >> mm15_run/train.log 2>&1 < /dev/null & "
          "echo $! > mm15_run/train.pid")


LOGS = ('cd "$HOME" && h=$(hostname); if [ ! -f mm15_run/train.pid ]; then echo "[$h] no mm15 train was started '
        'here"; exit 1; fi; tail -n 200 -F --pid=$(cat mm15_run/train.pid) mm15_run/train.log 2>/dev/null | sed -u '
        '"s/^/[$h] /"; if [ -f mm15_run/train.exit ]; then exit $(cat mm15_run/train.exit); fi; echo "[$h] mm15 '
        'train ended without an exit status (killed)"; exit 1')


def test_tpu_vm_single_slice():
  cmds = dry_run("tpu_vm.py", *VM, "--", *TRAIN_ARGS)
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mm15-3b", *SCOPE, "--worker", "all", "--command"]
  archive = os.path.join(tempfile.gettempdir(), "mm15_jax-mm15-3b.tar.gz")
  assert cmds == [
      ["gcloud", "compute", "tpus", "tpu-vm", "create", "mm15-3b", *SCOPE, "--accelerator-type", "v5p-128",
       "--version", "v2-alpha-tpuv5"],
      ["tar", "-czf", archive, *EXCLUDES, "-C", ROOT, "."],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, "mm15-3b:mm15_jax.tar.gz", *SCOPE, "--worker", "all"],
      ssh + ['cd "$HOME" && rm -rf mm15_jax && mkdir -p mm15_jax && tar -xzf mm15_jax.tar.gz -C mm15_jax && '
             + VENV + "-e 'mm15_jax[tpu]'"],
      ssh + [train_remote(TRAIN_ARGS)],  # gs:// paths reach the workers unchanged, no DCN axis for one slice
      ssh + [LOGS],
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "mm15-3b", *SCOPE, "--quiet"],
  ]


def test_tpu_vm_pass_through_flags():
  cmds = dry_run("tpu_vm.py", *VM, "--reserved", "--network", "net", "--subnetwork", "sub", "--service-account",
                 "sa@p.iam.gserviceaccount.com", "--internal-ip", "--libtpu-init-args",
                 "--xla_tpu_enable_async_collective_fusion=true --xla_x=1", "--steps", "create,install,train",
                 "--", *TRAIN_ARGS)
  assert cmds[0][-8:] == ["--reserved", "--network", "net", "--subnetwork", "sub", "--service-account",
                          "sa@p.iam.gserviceaccount.com", "--internal-ips"]
  assert cmds[2][-3:] == ["--internal-ip", "--worker", "all"]  # scp
  assert cmds[3][:13] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mm15-3b", *SCOPE, "--internal-ip",
                          "--worker", "all"]
  env = "LIBTPU_INIT_ARGS='--xla_tpu_enable_async_collective_fusion=true --xla_x=1' "
  assert remote(cmds[4]) == train_remote(TRAIN_ARGS, env=env)
  assert len(cmds) == 5


def test_tpu_vm_multislice_queued_resource():
  cmds = dry_run("tpu_vm.py", "--name", "ms", *SCOPE, "--accelerator-type", "v5p-64", "--version", "v2-alpha-tpuv5",
                 "--num-slices", "2", "--spot", "--package", "mm15_jax[tpu]==0.1.0", "--", *TRAIN_ARGS)
  qr = ["gcloud", "compute", "tpus", "queued-resources"]
  ssh = qr + ["ssh", "ms", *SCOPE, "--node", "all", "--worker", "all", "--command"]
  assert cmds == [
      qr + ["create", "ms", *SCOPE, "--node-count", "2", "--node-prefix", "ms", "--accelerator-type", "v5p-64",
            "--runtime-version", "v2-alpha-tpuv5", "--spot"],
      qr + ["describe", "ms", *SCOPE, "--format", "value(state.state)"],
      ssh + ['cd "$HOME" && ' + VENV + "'mm15_jax[tpu]==0.1.0'"],
      ssh + [train_remote([*TRAIN_ARGS, "--set", "mesh.dcn_data=2"])],
      ssh + [LOGS],
      qr + ["delete", "ms", *SCOPE, "--force", "--quiet"],
  ]


def test_tpu_vm_copies_every_slice():
  cmds = dry_run("tpu_vm.py", "--name", "ms", *SCOPE, "--accelerator-type", "v5p-64", "--version", "v", "--num-slices",
                 "3", "--steps", "install")
  archive = os.path.join(tempfile.gettempdir(), "mm15_jax-ms.tar.gz")
  assert [c[5:7] for c in cmds[1:4]] == [[archive, f"ms-{i}:mm15_jax.tar.gz"] for i in range(3)]
  assert len(cmds) == 5


def test_tpu_vm_reattach_and_bad_input():
  assert dry_run("tpu_vm.py", *VM, "--steps", "logs") == [
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mm15-3b", *SCOPE, "--worker", "all", "--command", LOGS]]
  for args, message in [
      (["--num-slices", "2", "--", "--set", "mesh.dcn_data=4", "--workdir", "gs://b/r"], "contradicts --num-slices 2"),
      ([], "mm15 train` arguments after --"),
      (["--steps", "train,delete", "--", *TRAIN_ARGS], "add logs"),
      (["--steps", "create,boot"], "--steps: unknown ['boot']"),
      (["--spot", "--reserved"], "not allowed with argument"),
  ]:
    out = launcher("tpu_vm.py", *VM, "--dry-run", *args)
    assert out.returncode and message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
  out = launcher("tpu_vm.py", "--name", "n", "--zone", "us-east5", "--accelerator-type", "v5p-8", "--version", "v",
                 "--dry-run", "--steps", "logs")
  assert out.returncode == 1 and out.stderr.startswith("--zone us-east5: give a zone such as us-east5-a")
  assert len(out.stderr.splitlines()) == 1


def test_the_copy_leaves_out_history_runs_and_venvs(tmp_path):
  """The archive command, run by tar here, over a checkout with everything that must stay behind."""
  src = tmp_path / "src"
  for path in ["setup.py", "mm15_jax/cli.py", "configs/mm15.py", ".git/HEAD", "runs/demo/x.json", "workdir/ckpt/1",
               ".venv/bin/python", ".venv-tpu/lib/x.py", "venv/pyvenv.cfg", "mm15_jax/__pycache__/cli.pyc",
               "mm15_jax.egg-info/PKG-INFO", "mm15_jax/data/runs.py"]:
    (src / path).parent.mkdir(parents=True, exist_ok=True)
    (src / path).write_text("x")
  cmds = dry_run("tpu_vm.py", *VM, "--source", str(src), "--steps", "install")
  archive = tmp_path / "a.tar.gz"
  pack = cmds[0][:2] + [str(archive)] + cmds[0][3:]
  subprocess.run(pack, check=True)
  with tarfile.open(archive) as t:
    files = sorted(m.name for m in t.getmembers() if m.isfile())
  assert files == ["./configs/mm15.py", "./mm15_jax/cli.py", "./mm15_jax/data/runs.py", "./setup.py"]


@pytest.fixture
def worker_home(tmp_path):
  """A worker's home with a stand-in mm15 that logs its arguments, then sleeps or exits as its last one says."""
  bin_dir = tmp_path / "mm15_venv" / "bin"
  bin_dir.mkdir(parents=True)
  (bin_dir / "mm15").write_text('#!/bin/bash\necho "args: $*"\necho "libtpu: $LIBTPU_INIT_ARGS"\n'
                                'trap \'echo "saved at SIGTERM"; exit 143\' TERM\n'
                                'case "${@: -1}" in\n  sleep) while true; do sleep 0.1; done;;\n'
                                '  *) exit "${@: -1}";;\nesac\n')
  (bin_dir / "mm15").chmod(0o755)
  yield tmp_path
  pid_file = tmp_path / "mm15_run" / "train.pid"
  if pid_file.exists():
    subprocess.run(["kill", "-KILL", "--", f"-{pid_file.read_text().strip()}"], capture_output=True)


def on_worker(home, script: str, timeout: float = 30) -> subprocess.CompletedProcess:
  """Runs a worker script here; the TPU lock it removes is one in `home` (this host's is not the test's)."""
  script = script.replace("/tmp/libtpu_lockfile", str(home / "libtpu_lockfile"))
  return subprocess.run(["bash", "-c", script], env={**os.environ, "HOME": str(home)}, capture_output=True, text=True,
                        timeout=timeout, stdin=subprocess.DEVNULL)


def group_alive(pgid: int) -> bool:
  return subprocess.run(["kill", "-0", "--", f"-{pgid}"], capture_output=True).returncode == 0


def worker_scripts(*train_args: str) -> tuple[str, str]:
  cmds = dry_run("tpu_vm.py", *VM, "--steps", "train,logs", "--libtpu-init-args=--xla_x=1", "--", *train_args)
  return remote(cmds[0]), remote(cmds[1])


def test_worker_job_is_detached_and_logs_reattach(worker_home):
  start, logs = worker_scripts("--workdir", "gs://b/r", "--stage", "sleep")
  t = time.monotonic()
  out = on_worker(worker_home, start)
  assert out.returncode == 0 and time.monotonic() - t < 10  # the ssh session ends at once, the job goes on
  pgid = int((worker_home / "mm15_run" / "train.pid").read_text())
  deadline = time.monotonic() + 10  # the pid is written once forked; setsid makes it a session leader just after
  while not group_alive(pgid) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert group_alive(pgid) and os.getpgid(pgid) == pgid and os.getsid(pgid) == pgid  # its own session
  # A rerun stops the running job (SIGTERM first: it saves), frees the TPU lock and starts the new one.
  start2, logs2 = worker_scripts("--workdir", "gs://b/r", "7")
  lockfile = worker_home / "libtpu_lockfile"
  lockfile.write_text("")
  assert start2.count("rm -f /tmp/libtpu_lockfile ") == 1
  out = on_worker(worker_home, start2)
  assert out.returncode == 0 and not lockfile.exists()
  assert not group_alive(pgid)
  out = on_worker(worker_home, logs2)  # follows until the job ends, then exits with its status
  host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
  assert out.returncode == 7, out
  lines = out.stdout.splitlines()
  assert f"[{host}] saved at SIGTERM" in lines
  assert lines[-2:] == [f"[{host}] args: train --workdir gs://b/r 7", f"[{host}] libtpu: --xla_x=1"]
  assert (worker_home / "mm15_run" / "train.exit").read_text().strip() == "7"


def test_logs_without_a_job(worker_home):
  out = on_worker(worker_home, LOGS)
  assert out.returncode == 1 and "no mm15 train was started here" in out.stdout


def test_xpk_workload_with_build():
  cmds = dry_run("xpk.py", "--cluster", "c1", "--project", "p", "--zone", "us-east5-a", "--image", "gcr.io/p/mm15:v1",
                 "--tpu-type", "v5p-128", "--num-slices", "4", "--workload", "run-1", "--build", "--", *TRAIN_ARGS)
  assert cmds == [
      ["docker", "build", "-f", os.path.join(ROOT, "launch", "gke", "Dockerfile"), "-t", "gcr.io/p/mm15:v1", ROOT],
      ["docker", "push", "gcr.io/p/mm15:v1"],
      ["xpk", "workload", "create", "--cluster", "c1", "--workload", "run-1", "--project", "p", "--zone", "us-east5-a",
       "--docker-image", "gcr.io/p/mm15:v1", "--tpu-type", "v5p-128", "--num-slices", "4", "--max-restarts", "10",
       "--command", shlex.join(["mm15", "train", *TRAIN_ARGS, "--set", "mesh.dcn_data=4"])],
  ]


def test_xpk_pass_through_and_bad_input():
  base = ["--cluster", "c", "--image", "i", "--tpu-type", "v6e-256"]
  cmds = dry_run("xpk.py", *base, "--workload", "a" * 40, "--max-restarts", "3", "--spot", "--libtpu-init-args",
                 "--xla_a=1 --xla_b=2", "--", "--workdir", "gs://b/r")
  assert cmds == [["xpk", "workload", "create", "--cluster", "c", "--workload", "a" * 40, "--docker-image", "i",
                   "--tpu-type", "v6e-256", "--num-slices", "1", "--max-restarts", "3", "--spot", "--env",
                   "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2", "--command", "mm15 train --workdir gs://b/r"]]
  assert dry_run("xpk.py", *base, "--reservation", "r1", "--", "--workdir", "w")[0][15:17] == ["--reservation", "r1"]
  default = dry_run("xpk.py", *base, "--", "--workdir", "w")[0]
  name = default[default.index("--workload") + 1]
  assert name.startswith("mm15-") and len(name) <= 40
  for bad in ["Run-1", "run_1", "1run", "run-", "a" * 41]:
    out = launcher("xpk.py", *base, "--dry-run", "--workload", bad, "--", "--workdir", "w")
    assert out.returncode == 1 and out.stderr.startswith(f"--workload {bad!r}: use lowercase"), out.stderr
    assert len(out.stderr.splitlines()) == 1
  out = launcher("xpk.py", *base, "--dry-run", "--zone", "us-east5", "--", "--workdir", "w")
  assert out.returncode == 1 and out.stderr.startswith("--zone us-east5: give the zone of the cluster's TPU node")


def test_dockerfile_installs_the_tpu_extra():
  with open(os.path.join(ROOT, "launch", "gke", "Dockerfile")) as f:
    text = f.read()
  assert "pip install --no-cache-dir -e '.[tpu]'" in text
  for path in ("setup.py", "mm15_jax", "configs"):  # what the COPY lines need is in the repository
    assert f"COPY {path}" in text and os.path.exists(os.path.join(ROOT, path))


def test_python_requires_matches_jax():
  """setup.py's floor is the pinned jax's own (a TPU VM image's Python 3.10 would install an older jax)."""
  from importlib import metadata
  with open(os.path.join(ROOT, "setup.py")) as f:
    setup = f.read()
  jax_floor = metadata.metadata("jax")["Requires-Python"]
  assert f'python_requires="{jax_floor}"' in setup, jax_floor


def test_cloud_tpu_initializes_jax_distributed(monkeypatch):
  """On TPU hosts (one or many, TPU_WORKER_HOSTNAMES with or without a comma) jax.distributed is initialized
  without arguments; a CPU host without MM15_COORDINATOR is left alone."""
  import jax
  from jax._src import cloud_tpu_init
  from mm15_jax.train import distributed
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  monkeypatch.delenv("MM15_COORDINATOR", raising=False)
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  for on_tpu, hosts, expected in [(True, "", 1), (True, "w-0", 1), (True, "w-0,w-1", 1), (False, "w-0,w-1", 0)]:
    calls.clear()
    monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", on_tpu)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", hosts)
    monkeypatch.setattr(distributed, "_initialized", False)
    distributed.initialize()
    assert calls == [((), {})] * expected, (on_tpu, hosts)
  monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # a TPU host told to compute on its CPU
  assert not distributed.on_cloud_tpu()


def test_a_missing_tool_is_one_line():
  out = launcher("xpk.py", "--cluster", "c", "--image", "i", "--tpu-type", "v5p-8", "--", "--workdir", "w")
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines() == ["xpk: not found on PATH; install it (gcloud: the Google Cloud CLI, xpk: "
                                             "pip install xpk, docker) or run with --dry-run to see the commands"]
