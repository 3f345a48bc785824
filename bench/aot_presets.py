"""Per-chip memory of every paper-size preset and stage, from ahead-of-time compiles for a TPU slice.

    python bench/aot_presets.py --out bench/results/aot_presets.jsonl            # compile what is missing
    python bench/aot_presets.py --out bench/results/aot_presets.jsonl --table    # print the markdown tables

Each (preset, stage) compiles in its own `mm15 aot` process (a compile of the 30B step holds tens of GB of host
memory; a fresh process returns it), appending one JSON line to --out; rows already there are skipped, so an
interrupted sweep resumes. Needs libtpu (pip install -e '.[tpu]').
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PRESETS = ("1b", "3b", "7b", "30b", "1b-moe", "3b-moe")
STAGES = ("pretrain", "ocr", "sft")
# (topology, mesh overrides) per preset: the smallest v5p slice tried first; fsdp over every chip.
DEFAULT_SLICE = ("v5p:4x4x4", ["mesh.data=1", "mesh.fsdp=-1"])


def load(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def compile_one(size: str, stage: str, topology: str, sets: list[str], out: str, timeout: int) -> None:
  cmd = [sys.executable, "-m", "mm15_jax.cli", "aot", "--config", "mm15", "--arg", f"size={size}", "--stage",
         stage, "--topology", topology, "--json", out] + [a for s in sets for a in ("--set", s)]
  print("$", " ".join(cmd[2:]), flush=True)
  start = time.time()
  try:
    proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
  except subprocess.TimeoutExpired:
    print(f"  timed out after {timeout} s", flush=True)
    return
  tail = (proc.stdout + proc.stderr).strip().splitlines()[-14:]
  print("\n".join("  " + line for line in tail), f"\n  ({time.time() - start:.0f} s, exit {proc.returncode})",
        flush=True)


def table(rows: list[dict]) -> str:
  gib = lambda b: f"{b / 2**30:.2f}"
  lines = ["| preset | stage | slice | mesh, other settings | batch (global) | params | opt state | activations | "
           "total | HBM | fits | compile |", "|" + "---|" * 12]
  order = lambda r: (PRESETS.index(r["experiment"].removeprefix("mm15-")), STAGES.index(r["stage"]),
                     len(_extra(r)), _grad_accum(r))
  for r in sorted(rows, key=order):
    mesh = " ".join([f"{k}={v}" for k, v in r["mesh"].items() if v > 1] + _extra(r))
    batch = "x".join(map(str, r["batch_shapes"]["tokens"]))
    img = r["batch_shapes"]["images"]
    lines.append(
        f"| {r['experiment'].removeprefix('mm15-')} | {r['stage']} | {r['topology']} | {mesh} | {batch} tok, "
        f"{img[1]} x {img[2]} px img | {gib(r['params_bytes'])} | {gib(r['opt_state_bytes'])} | "
        f"{gib(r['temp_bytes'])} | {gib(r['total_bytes'])} | {gib(r['hbm_bytes'])} | "
        f"{'yes' if r['fits'] else 'NO' + (' (refused)' if r.get('out_of_memory') else '')} | "
        f"{r['compile_s'] / 60:.1f} min |")
  return "\n".join(lines)


def _extra(r: dict) -> list[str]:
  """The row's overrides beyond the mesh, `stages.<stage>.` dropped (e.g. ["grad_accum=2"])."""
  return [o.removeprefix(f"stages.{r['stage']}.") for o in r.get("overrides", DEFAULT_SLICE[1])
          if not o.startswith("mesh.")]


def _grad_accum(r: dict) -> int:
  return next((int(o.split("=")[1]) for o in _extra(r) if o.startswith("grad_accum=")), 1)


def summary(rows: list[dict]) -> str:
  """Preset x stage: the setting that fits with the fewest rows split off per step (lowest grad_accum), or NO with
  the closest miss; '-' where nothing was compiled."""
  stages = [st for st in STAGES if any(r["stage"] == st for r in rows)]
  lines = ["| preset | " + " | ".join(stages) + " |", "|" + "---|" * (len(stages) + 1)]
  for preset in PRESETS:
    cells = []
    for stage in stages:
      here = [r for r in rows if r["experiment"] == f"mm15-{preset}" and r["stage"] == stage]
      fitting = sorted((r for r in here if r["fits"]), key=lambda r: (_grad_accum(r), len(_extra(r))))
      if fitting:
        r = fitting[0]
        cells.append(f"{' '.join(_extra(r)) or 'as is'}: {r['total_bytes'] / 2**30:.1f} GiB")
      elif here:
        r = min(here, key=lambda r: r["total_bytes"])
        cells.append(f"NO (closest: {' '.join(_extra(r)) or 'as is'}, {r['total_bytes'] / 2**30:.1f} GiB)")
      else:
        cells.append("-")
    if any(c != "-" for c in cells):
      lines.append(f"| {preset} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="bench/results/aot_presets.jsonl")
  p.add_argument("--presets", default=",".join(PRESETS))
  p.add_argument("--stages", default=",".join(STAGES))
  p.add_argument("--topology", default=DEFAULT_SLICE[0])
  p.add_argument("--set", action="append", default=None, help="config overrides (default: fsdp over all chips)")
  p.add_argument("--per-stage", action="append", default=[],
                 help="override with STAGE replaced by the stage's name, e.g. stages.STAGE.grad_accum=2")
  p.add_argument("--timeout", type=int, default=3600, help="seconds per compile")
  p.add_argument("--table", action="store_true", help="print the markdown tables of --out and exit")
  a = p.parse_args(argv)
  if a.table:
    rows = load(a.out)
    print(summary(rows), "", table(rows), sep="\n")
    return
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  sets = DEFAULT_SLICE[1] if a.set is None else a.set
  for size in a.presets.split(","):
    for stage in a.stages.split(","):
      sets_here = sets + [o.replace("STAGE", stage) for o in a.per_stage]
      done = any(r["experiment"] == f"mm15-{size}" and r["stage"] == stage and r["topology"] == a.topology
                 and r.get("overrides", DEFAULT_SLICE[1]) == sets_here for r in load(a.out))
      if not done:
        compile_one(size, stage, a.topology, sets_here, a.out, a.timeout)


if __name__ == "__main__":
  main()
