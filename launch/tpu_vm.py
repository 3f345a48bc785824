"""Trains on Cloud TPU VMs: create the slice(s), install this project on every worker, start `mm15 train` on all
workers in the background, follow their logs, delete the slice(s) when the job has ended.

    python launch/tpu_vm.py --name mm15-3b --zone us-east5-a --accelerator-type v5p-128 \\
        --version v2-alpha-tpuv5 -- --config mm15 --arg size=3b --arg data_dir=gs://BUCKET/data \\
        --workdir gs://BUCKET/runs/3b
    python launch/tpu_vm.py --name mm15-3b --zone us-east5-a --accelerator-type v5p-128 \\
        --version v2-alpha-tpuv5 --steps logs      # reattach after a dropped connection

Steps (--steps, default all, in this order):
  create   the TPU VM, or a queued resource (--queued; implied by --num-slices > 1) that waits for capacity. With N
           slices the nodes are NAME-0 .. NAME-(N-1), jax joins them over DCN and `--set mesh.dcn_data=N` is added.
  install  this checkout, packed without .git, runs/, workdir/, virtual environments and caches (or --package, a
           pip requirement), into a Python 3.11 virtual environment ~/mm15_venv on every worker, made by uv: the
           TPU VM images run Ubuntu 22.04, whose Python 3.10 is older than jax needs; uv fetches its own 3.11.
  train    stops an earlier run's process group (its pid in ~/mm15_run/train.pid; SIGTERM, so it saves, then
           SIGKILL after 60 s), removes /tmp/libtpu_lockfile and starts `mm15 train` detached (setsid nohup), its
           output appended to ~/mm15_run/train.log: a dropped connection does not stop the job.
  logs     follows every worker's log (lines prefixed with the worker's host name) until the job ends there, and
           exits with the job's status; run `--steps logs` alone to reattach.
  delete   only after logs saw the job succeed (or --steps delete alone): a failed or unfinished job keeps its
           slice for a look and a rerun; --keep never deletes.
Everything after `--` is passed to `mm15 train` unchanged. --dry-run prints the commands and runs none.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import run, train_command  # noqa: E402

STEPS = ("create", "install", "train", "logs", "delete")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Left out of the copy to the workers: history, run folders, virtual environments, caches, build outputs.
COPY_EXCLUDES = (".git", "./runs", "./workdir", ".venv*", "venv", "__pycache__", "*.egg-info", ".pytest_cache")
# On the workers, relative to the home directory (every remote command starts with `cd "$HOME"`).
SOURCE, ARCHIVE, VENV, RUN_DIR = "mm15_jax", "mm15_jax.tar.gz", "mm15_venv", "mm15_run"
STOP_GRACE_S = 60
LOG_LINES = 200  # of the log shown on (re)attach
ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")


def gcloud_scope(a) -> list[str]:
  return ["--zone", a.zone] + (["--project", a.project] if a.project else [])


def create_commands(a) -> list[list[str]]:
  options = [*(["--spot"] if a.spot else []), *(["--reserved"] if a.reserved else []),
             *(["--network", a.network] if a.network else []),
             *(["--subnetwork", a.subnetwork] if a.subnetwork else []),
             *(["--service-account", a.service_account] if a.service_account else []),
             *(["--internal-ips"] if a.internal_ip else [])]
  if not a.queued:
    return [["gcloud", "compute", "tpus", "tpu-vm", "create", a.name, *gcloud_scope(a),
             "--accelerator-type", a.accelerator_type, "--version", a.version, *options]]
  nodes = (["--node-count", str(a.num_slices), "--node-prefix", a.name] if a.num_slices > 1
           else ["--node-id", a.name])
  return [["gcloud", "compute", "tpus", "queued-resources", "create", a.name, *gcloud_scope(a), *nodes,
           "--accelerator-type", a.accelerator_type, "--runtime-version", a.version, *options]]


def ssh_command(a, remote: str) -> list[str]:
  """Runs `remote` (a bash command line) on every worker of every slice."""
  ip = ["--internal-ip"] if a.internal_ip else []
  if a.queued:
    return ["gcloud", "compute", "tpus", "queued-resources", "ssh", a.name, *gcloud_scope(a), *ip, "--node", "all",
            "--worker", "all", "--command", remote]
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", a.name, *gcloud_scope(a), *ip, "--worker", "all",
          "--command", remote]


def local_archive(a) -> str:
  return os.path.join(tempfile.gettempdir(), f"mm15_jax-{a.name}.tar.gz")


def install_commands(a) -> list[list[str]]:
  """The checkout packed here and copied to every worker (or --package), installed with the `tpu` extra."""
  venv = (f"python3 -m pip install --user --quiet --upgrade uv && "
          f"python3 -m uv venv --python 3.11 --allow-existing {VENV} && "
          f"python3 -m uv pip install --python {VENV}/bin/python ")
  if a.package:
    return [ssh_command(a, 'cd "$HOME" && ' + venv + shlex.quote(a.package))]
  nodes = [f"{a.name}-{i}" for i in range(a.num_slices)] if a.queued and a.num_slices > 1 else [a.name]
  archive = local_archive(a)
  pack = ["tar", "-czf", archive, *(f"--exclude={p}" for p in COPY_EXCLUDES), "-C", a.source, "."]
  ip = ["--internal-ip"] if a.internal_ip else []
  copies = [["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{node}:mm15_jax.tar.gz", *gcloud_scope(a), *ip,
             "--worker", "all"] for node in nodes]
  unpack = f'cd "$HOME" && rm -rf {SOURCE} && mkdir -p {SOURCE} && tar -xzf {ARCHIVE} -C {SOURCE} && '
  return [pack, *copies, ssh_command(a, unpack + venv + f"-e '{SOURCE}[tpu]'")]


def train_remote(a) -> str:
  """Stops the previous run, frees the TPU, starts `mm15 train` detached from the ssh session."""
  train = shlex.join([f"{VENV}/bin/mm15", *train_command(a.train_args, a.num_slices)[1:]])
  job = f"{train}; echo $? > {RUN_DIR}/train.exit"
  env = f"LIBTPU_INIT_ARGS={shlex.quote(a.libtpu_init_args)} " if a.libtpu_init_args else ""
  return (f'cd "$HOME" && mkdir -p {RUN_DIR} && '
          f"if [ -f {RUN_DIR}/train.pid ]; then p=$(cat {RUN_DIR}/train.pid); "
          f"kill -TERM -- -$p 2>/dev/null && for i in $(seq {STOP_GRACE_S}); do kill -0 -- -$p 2>/dev/null || break; "
          f"sleep 1; done; kill -KILL -- -$p 2>/dev/null; fi; "
          f"rm -f /tmp/libtpu_lockfile {RUN_DIR}/train.exit; "
          f"{env}setsid nohup bash -c {shlex.quote(job)} >> {RUN_DIR}/train.log 2>&1 < /dev/null & "
          f"echo $! > {RUN_DIR}/train.pid")


def logs_remote() -> str:
  """Follows the log until the job's process group leader exits; the job's status is the exit status."""
  return (f'cd "$HOME" && h=$(hostname); '
          f'if [ ! -f {RUN_DIR}/train.pid ]; then echo "[$h] no mm15 train was started here"; exit 1; fi; '
          f"tail -n {LOG_LINES} -F --pid=$(cat {RUN_DIR}/train.pid) {RUN_DIR}/train.log 2>/dev/null "
          f'| sed -u "s/^/[$h] /"; '
          f"if [ -f {RUN_DIR}/train.exit ]; then exit $(cat {RUN_DIR}/train.exit); fi; "
          f'echo "[$h] mm15 train ended without an exit status (killed)"; exit 1')


def delete_commands(a) -> list[list[str]]:
  if a.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", a.name, *gcloud_scope(a), "--force",
             "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", a.name, *gcloud_scope(a), "--quiet"]]


def wait_active(a) -> None:
  """A queued resource provisions when capacity allows: poll its state until ACTIVE."""
  cmd = ["gcloud", "compute", "tpus", "queued-resources", "describe", a.name, *gcloud_scope(a),
         "--format", "value(state.state)"]
  run(cmd, a.dry_run)
  while not a.dry_run:
    state = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED"):
      raise SystemExit(f"queued resource {a.name} is {state}")
    time.sleep(60)


def parse(argv: list[str] | None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", required=True, help="TPU VM or queued resource name")
  p.add_argument("--zone", required=True, help="e.g. us-east5-a (a zone, not a region)")
  p.add_argument("--project", default="")
  p.add_argument("--accelerator-type", required=True, help="e.g. v5p-128, v5litepod-256, v6e-256")
  p.add_argument("--version", required=True, help="TPU VM runtime, e.g. v2-alpha-tpuv5, v2-alpha-tpuv6e")
  p.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (multi-slice)")
  p.add_argument("--queued", action="store_true", help="create through a queued resource (waits for capacity)")
  capacity = p.add_mutually_exclusive_group()
  capacity.add_argument("--spot", action="store_true", help="Spot capacity (preemptible)")
  capacity.add_argument("--reserved", action="store_true", help="the project's reserved capacity")
  p.add_argument("--network", default="", help="VPC network of the workers")
  p.add_argument("--subnetwork", default="")
  p.add_argument("--service-account", default="", help="the workers' service account (needs the buckets)")
  p.add_argument("--internal-ip", action="store_true",
                 help="workers without external IPs (create --internal-ips); ssh / scp over internal IPs")
  p.add_argument("--libtpu-init-args", default="",
                 help="LIBTPU_INIT_ARGS for the job, written --libtpu-init-args='--xla_...=true ...'")
  p.add_argument("--package", default="", help="pip requirement to install instead of copying this checkout")
  p.add_argument("--source", default=REPO_ROOT, help="checkout copied to the workers (without --package)")
  p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {','.join(STEPS)}")
  p.add_argument("--keep", action="store_true", help="never delete the slice")
  p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the `mm15 train` arguments")
  a = p.parse_args(argv)
  a.queued = a.queued or a.num_slices > 1
  a.steps = a.steps.split(",")
  unknown = sorted(set(a.steps) - set(STEPS))
  if unknown:
    raise SystemExit(f"--steps: unknown {unknown}; choose from {','.join(STEPS)}")
  if "train" in a.steps and "delete" in a.steps and "logs" not in a.steps:
    raise SystemExit("--steps: delete right after train would stop the job; add logs (it waits for the job to end)")
  if not ZONE.fullmatch(a.zone):
    raise SystemExit(f"--zone {a.zone}: give a zone such as us-east5-a (TPU VMs live in a zone, not a region)")
  if not a.package and "install" in a.steps and not os.path.isfile(os.path.join(a.source, "setup.py")):
    raise SystemExit(f"--source {a.source}: no setup.py there; give the mm15_jax checkout or --package")
  return a


def main(argv: list[str] | None = None) -> int:
  a = parse(argv)
  remote = train_remote(a) if "train" in a.steps else ""  # argument errors before anything is created
  if "create" in a.steps:
    for cmd in create_commands(a):
      run(cmd, a.dry_run)
    if a.queued:
      wait_active(a)
  if "install" in a.steps:
    for cmd in install_commands(a):
      run(cmd, a.dry_run)
  if "train" in a.steps:
    run(ssh_command(a, remote), a.dry_run)
  status = 0
  if "logs" in a.steps:
    status = run(ssh_command(a, logs_remote()), a.dry_run, check=False)
  if "delete" in a.steps and not a.keep:
    if status and not a.dry_run:
      print(f"[launch] the job failed or is still running (status {status}); {a.name} is kept: reattach with "
            f"--steps logs, delete with --steps delete", file=sys.stderr)
    else:
      for cmd in delete_commands(a):
        run(cmd, a.dry_run)
  return status


if __name__ == "__main__":
  sys.exit(main())
