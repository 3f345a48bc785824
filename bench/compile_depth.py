"""Compile time of the real train step against decoder depth, with the layer stack scanned or unrolled.

    python bench/compile_depth.py            # depths 2, 4, 8, 16
    python bench/compile_depth.py --quick    # depths 2, 4 with fast-compile options (a smoke run)

The step is the runner's (stage.build_stage: state shardings, state donated; a 1-device mesh) for a small model of
the recipe's structure with an MoE FFN in every second layer; the state and batch are abstract (nothing is
allocated or run), so the figures are tracing + lowering and XLA compilation alone, in wall time and in this
process's CPU time (steadier on a shared machine). model.scan_layers=True runs the stacked layers under
jax.lax.scan (one copy of a unit in the program), False unrolls them. Every compile runs in this process with jax's
in-memory caches cleared first, after one unreported warm-up compile (none with --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from mm15_jax import machine  # noqa: E402
from mm15_jax import sharding  # noqa: E402
from mm15_jax.config import (ConnectorConfig, DataConfig, DecoderConfig, Experiment, MeshConfig,  # noqa: E402
                             ModelConfig, MoEConfig, SplitConfig, StageConfig, VisionConfig)
from mm15_jax.train import stage as stage_lib  # noqa: E402

IMAGE_TOKEN_ID = 3
TILE, POOLED_SIDE = 16, 2
BATCH, SEQ_LEN, MAX_IMAGES = 2, 128, 1
# XLA:CPU options that halve compile time (its fusion emitters and LLVM optimisation cost more than they save here).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def model_config(num_layers: int, scan_layers: bool) -> ModelConfig:
  return ModelConfig(
      vision=VisionConfig(image_size=TILE, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64, pre_norm=False),
      connector=ConnectorConfig(hidden=32, depth=1, pooled_side=POOLED_SIDE, se_ratio=0.0),
      decoder=DecoderConfig(vocab_size=512, d_model=64, num_layers=num_layers, num_heads=4, num_kv_heads=2,
                            ffn_dim=128, max_len=SEQ_LEN, moe=MoEConfig(num_experts=4, top_k=2, every=2)),
      dtype="float32", param_dtype="float32", remat="none", scan_layers=scan_layers)


def experiment(num_layers: int, scan_layers: bool) -> Experiment:
  """One stage of BATCH rows of SEQ_LEN tokens and MAX_IMAGES finished tiles (resized on the host)."""
  data = DataConfig(mixture={"bench": 1.0}, seq_len=SEQ_LEN, max_images=MAX_IMAGES,
                    split=SplitConfig(enlarge_on_device=False))
  stage = StageConfig(steps=100, batch_size=BATCH, image_size=TILE, data=data)
  return Experiment(model=model_config(num_layers, scan_layers), stages=[stage], mesh=MeshConfig(data=1))


def compile_step(num_layers: int, scan_layers: bool, compiler_options=None) -> dict:
  """Lowers and compiles the train step for this depth -> timings and the compiled program's size."""
  jax.clear_caches()
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  exp = experiment(num_layers, scan_layers)
  start = time.perf_counter()
  built = stage_lib.build_stage(exp, 0, mesh, vocab_size=exp.model.decoder.vocab_size,
                                image_token_id=IMAGE_TOKEN_ID, compiler_options=compiler_options)
  setup_s = time.perf_counter() - start
  with sharding.use_mesh(mesh):
    start, cpu_start = time.perf_counter(), time.process_time()
    lowered = built.step.lower(built.state, built.batch_spec())
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
  return {"layers": num_layers, "scan_layers": scan_layers, "setup_s": round(setup_s, 3),
          "lower_s": round(lower_s, 3), "compile_s": round(compile_s, 3), "total_s": round(lower_s + compile_s, 3),
          "cpu_s": round(cpu_s, 3), "hlo_chars": len(lowered.as_text()),
          "num_params": sum(x.size for x in jax.tree.leaves(built.state.params))}


def table(rows: list[dict]) -> str:
  by = {(r["layers"], r["scan_layers"]): r for r in rows}
  lines = ["| layers | scan: lower + compile s | scan: CPU s | scan: StableHLO chars | unrolled: lower + compile s | "
           "unrolled: CPU s | unrolled: StableHLO chars | unrolled / scan (CPU) |", "|---|---|---|---|---|---|---|---|"]
  for d in sorted({r["layers"] for r in rows}):
    s, u = by[(d, True)], by[(d, False)]
    lines.append(f"| {d} | {s['lower_s']:.1f} + {s['compile_s']:.1f} | {s['cpu_s']:.1f} | {s['hlo_chars']} | "
                 f"{u['lower_s']:.1f} + {u['compile_s']:.1f} | {u['cpu_s']:.1f} | {u['hlo_chars']} | "
                 f"{u['cpu_s'] / s['cpu_s']:.2f} |")
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  argv = sys.argv[1:] if argv is None else list(argv)
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="depths 2,4, --fast-compile, no warm-up compile")
  p.add_argument("--depths", default="", help="comma-separated decoder depths (default 2,4,8,16; 2,4 with --quick)")
  p.add_argument("--fast-compile", action="store_true", help=f"compile with {FAST_COMPILE}")
  a = p.parse_args(argv)
  depths = [int(d) for d in (a.depths or ("2,4" if a.quick else "2,4,8,16")).split(",")]
  options = FAST_COMPILE if a.quick or a.fast_compile else None
  if not a.quick:  # not reported: the first compile of a process pays for warming jax up
    compile_step(depths[0], True, options)
  rows = []
  for d in depths:
    for scan in (True, False):
      rows.append(compile_step(d, scan, options))
      print(f"layers {d} scan {scan}: {rows[-1]['total_s']:.1f} s", file=sys.stderr, flush=True)
  print(table(rows))
  print(f"Measured on a shared machine under load, one compile per row (CPU: this process's CPU time, less sensitive "
        f"to other jobs than wall time); XLA options: {options or 'defaults'}.")
  print(json.dumps({"bench": "compile_depth", **machine.describe(" ".join(["python", "bench/compile_depth.py", *argv])), "compiler_options": options, "rows": rows}))
  return rows


if __name__ == "__main__":
  main()
