"""Trains on a GKE TPU cluster with xpk: build and push the image (launch/gke/Dockerfile), then one xpk workload
that runs `mm15 train` on every host of every slice.

    python launch/xpk.py --cluster my-cluster --project P --zone us-east5-a --image gcr.io/P/mm15:latest \\
        --tpu-type v5p-128 --num-slices 2 --build -- --config mm15 --arg size=3b \\
        --arg data_dir=gs://BUCKET/data --workdir gs://BUCKET/runs/3b

--zone is the zone of the cluster's TPU node pools (xpk finds a regional cluster from it). --max-restarts (default
10) lets the JobSet restart the workload after a preemption: `mm15 train` saves on SIGTERM and exits 143, which xpk
passes on, and the restarted job resumes from that checkpoint. --num-slices N > 1 adds `--set mesh.dcn_data=N`
(data parallel across slices over DCN). Everything after `--` is passed to `mm15 train` unchanged. --dry-run prints
the commands and runs none.
"""
from __future__ import annotations

import argparse
import getpass
import os
import re
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import run, train_command  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(REPO_ROOT, "launch", "gke", "Dockerfile")
WORKLOAD = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # xpk's own check (a Kubernetes name), at most 40 characters
WORKLOAD_MAX = 40
ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")


def build_commands(image: str) -> list[list[str]]:
  return [["docker", "build", "-f", DOCKERFILE, "-t", image, REPO_ROOT], ["docker", "push", image]]


def workload_command(a) -> list[str]:
  scope = (["--project", a.project] if a.project else []) + (["--zone", a.zone] if a.zone else [])
  capacity = (["--spot"] if a.spot else []) + (["--reservation", a.reservation] if a.reservation else [])
  env = ["--env", f"LIBTPU_INIT_ARGS={a.libtpu_init_args}"] if a.libtpu_init_args else []
  return ["xpk", "workload", "create", "--cluster", a.cluster, "--workload", a.workload, *scope,
          "--docker-image", a.image, "--tpu-type", a.tpu_type, "--num-slices", str(a.num_slices),
          "--max-restarts", str(a.max_restarts), *capacity, *env,
          "--command", shlex.join(train_command(a.train_args, a.num_slices))]


def parse(argv: list[str] | None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cluster", required=True)
  p.add_argument("--project", default="", help="default: gcloud's configured project")
  p.add_argument("--zone", default="", help="zone of the TPU node pools, e.g. us-east5-a (default: gcloud's)")
  p.add_argument("--image", required=True, help="image to run, e.g. gcr.io/PROJECT/mm15:TAG")
  p.add_argument("--tpu-type", required=True, help="e.g. v5p-128, v5litepod-256, v6e-256")
  p.add_argument("--num-slices", type=int, default=1)
  p.add_argument("--workload", default="", help="workload name (default: mm15-USER-MMDDHHMM)")
  p.add_argument("--max-restarts", type=int, default=10, help="JobSet restarts after a preemption or failure")
  capacity = p.add_mutually_exclusive_group()
  capacity.add_argument("--spot", action="store_true", help="Spot capacity (clusters with autoprovisioning)")
  capacity.add_argument("--reservation", default="", help="a reservation (clusters with autoprovisioning)")
  p.add_argument("--libtpu-init-args", default="",
                 help="LIBTPU_INIT_ARGS for the job, written --libtpu-init-args='--xla_...=true ...'")
  p.add_argument("--build", action="store_true", help="docker build + push the image first")
  p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the `mm15 train` arguments")
  a = p.parse_args(argv)
  if not a.workload:
    user = re.sub(r"[^a-z0-9-]", "", getpass.getuser().lower())[:20].strip("-") or "user"
    a.workload = f"mm15-{user}-{time.strftime('%m%d%H%M')}"
  if not WORKLOAD.fullmatch(a.workload) or len(a.workload) > WORKLOAD_MAX:
    raise SystemExit(f"--workload {a.workload!r}: use lowercase letters, digits and '-', starting with a letter and "
                     f"not ending with '-', at most {WORKLOAD_MAX} characters")
  if a.zone and not ZONE.fullmatch(a.zone):
    raise SystemExit(f"--zone {a.zone}: give the zone of the cluster's TPU node pools, e.g. us-east5-a, not a region")
  if a.max_restarts < 0:
    raise SystemExit(f"--max-restarts {a.max_restarts}: must be >= 0")
  return a


def main(argv: list[str] | None = None) -> int:
  a = parse(argv)
  workload = workload_command(a)  # argument errors before anything is built
  if a.build:
    for cmd in build_commands(a.image):
      run(cmd, a.dry_run)
  return run(workload, a.dry_run, check=False)


if __name__ == "__main__":
  sys.exit(main())
