"""What the launchers share: the `mm15 train` command line and printing / running commands.

Train arguments pass through unchanged (gs:// data and checkpoint paths included); multi-slice adds
`--set mesh.dcn_data=N`, the mesh axis that spans the slices over DCN.
"""
from __future__ import annotations

import shlex
import subprocess


def train_command(train_args: list[str], num_slices: int = 1) -> list[str]:
  """["mm15", "train", *train_args] with the DCN axis set to the slice count."""
  if train_args and train_args[0] == "--":
    train_args = train_args[1:]
  if not train_args:
    raise SystemExit("give the `mm15 train` arguments after --, e.g. -- --config mm15 --workdir gs://BUCKET/run")
  dcn = [a.split("=", 1)[1] for a in train_args if a.startswith("mesh.dcn_data=")]
  if num_slices < 1:
    raise SystemExit(f"--num-slices {num_slices}: must be >= 1")
  if any(v != str(num_slices) for v in dcn):
    raise SystemExit(f"mesh.dcn_data={dcn[0]} contradicts --num-slices {num_slices} (the launcher sets it)")
  extra = ["--set", f"mesh.dcn_data={num_slices}"] if num_slices > 1 and not dcn else []
  return ["mm15", "train", *train_args, *extra]


def run(cmd: list[str], dry_run: bool, check: bool = True) -> int:
  """Prints the command (shell-quoted, exactly as run) and runs it unless `dry_run`; with `check`, a failure stops
  the launcher with one line (the tool's own message is above it)."""
  print(shlex.join(cmd), flush=True)
  if dry_run:
    return 0
  try:
    status = subprocess.run(cmd).returncode
  except FileNotFoundError:
    raise SystemExit(f"{cmd[0]}: not found on PATH; install it (gcloud: the Google Cloud CLI, xpk: pip install xpk, "
                     f"docker) or run with --dry-run to see the commands") from None
  if check and status:
    raise SystemExit(f"{shlex.join(cmd[:5])} ... failed with status {status} (its message is above)")
  return status
