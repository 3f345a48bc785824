"""Roofline estimate of a deep preset from unrolled compiles of shallow copies of it.

    python bench/roofline_depth.py --size 3b --stage sft --topology v5p:4x4x4 --out bench/results/roofline_depth.jsonl

XLA's cost analysis counts a scanned layer stack once, and an unrolled compile of a 28-layer decoder with a 32-layer
ViT takes hours on a small host. Per step, FLOPs, HBM bytes and collective bytes are linear in the number of decoder
layers d and ViT blocks v (every layer of a stack is the same program), so three unrolled compiles, at (d, v) =
(2, 2), (4, 2) and (2, 4), fix a + b d + c v for each, evaluated at the preset's depths. The roofline (train/
roofline.py, attention kernels' FLOPs included) is then an estimate from an extrapolation; label it so.
Each compile appends its `mm15 aot --json` line to --out; lines already there are reused.
"""
from __future__ import annotations

import argparse
import os
import sys

from mm15_jax import cli
from mm15_jax.train import aot, roofline
from mm15_jax.train import flops as flops_lib
from mm15_jax.train import stage as stage_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aot_presets  # noqa: E402  (bench/ is not a package)

DEPTHS = ((2, 2), (4, 2), (2, 4))


def _compile(a, decoder_layers: int, vit_depth: int) -> dict:
  """The `mm15 aot --json` line of the preset at these depths: from --out, else compiled now and appended there."""
  sets = a.set + ["model.scan_layers=false", f"model.decoder.num_layers={decoder_layers}",
                  f"model.vision.depth={vit_depth}"]

  def done():
    return next((r for r in aot_presets.load(a.out) if r["experiment"] == f"mm15-{a.size}" and r["stage"] == a.stage
                 and r["overrides"] == sets), None)

  if done() is None:
    aot_presets.compile_one(a.size, a.stage, a.topology, sets, a.out, a.timeout)
  row = done()
  if row is None:
    raise SystemExit(f"the compile at {decoder_layers} decoder layers and {vit_depth} ViT blocks wrote no line to "
                     f"{a.out} (its output is above)")
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", default="3b")
  p.add_argument("--stage", default="sft")
  p.add_argument("--topology", default="v5p:4x4x4")
  p.add_argument("--set", action="append", default=None,
                 help="config overrides (default: mesh.data=1 mesh.fsdp=-1 stages.STAGE.grad_accum=1)")
  p.add_argument("--out", default="bench/results/roofline_depth.jsonl")
  p.add_argument("--timeout", type=int, default=3600, help="seconds per compile")
  a = p.parse_args(argv)
  a.set = a.set or ["mesh.data=1", "mesh.fsdp=-1", f"stages.{a.stage}.grad_accum=1"]
  base, deeper, wider = (_compile(a, d, v) for d, v in DEPTHS)
  exp = cli.load_experiment("mm15", [f"size={a.size}"], a.set)
  index = [s.name for s in exp.stages].index(a.stage)
  stage = exp.stages[index]
  model = stage_lib.stage_model_config(exp.model, stage, exp.model.decoder.vocab_size)
  d, v = model.decoder.num_layers, model.vision.depth

  def at_depth(get) -> float:  # a + b d + c v through the three compiles
    per_layer, per_block = (get(deeper) - get(base)) / 2, (get(wider) - get(base)) / 2
    return get(base) + per_layer * (d - DEPTHS[0][0]) + per_block * (v - DEPTHS[0][1])

  n = base["num_devices"]
  xla_flops = at_depth(lambda r: r["flops"])
  hbm_bytes = at_depth(lambda r: r["bytes_accessed"])
  collectives = {k: int(at_depth(lambda r: r["collective_bytes"].get(k, 0))) for k in base["collective_bytes"]}
  kernel_flops = aot.attention_kernel_flops(model, stage, "tpu") / n
  model_flops = flops_lib.train_step_flops(model, **flops_lib.stage_shapes(stage)) / n
  print(f"{a.size} {a.stage} on {a.topology}, {d} decoder layers and {v} ViT blocks, extrapolated from unrolled "
        f"compiles at (decoder, ViT) = {DEPTHS}:")
  print("\n".join(roofline.report_lines(device_kind=base["device_kind"], flops=xla_flops, hbm_bytes=hbm_bytes,
                                        collectives=collectives, model_flops=model_flops, kernel_flops=kernel_flops)))


if __name__ == "__main__":
  main()
