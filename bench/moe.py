"""MoE FFN layer against a dense SwiGLU FFN of the same active FLOPs: forward + backward, jitted, CPU, float32.

    python bench/moe.py            # 8k and 16k tokens, d_model 256 and 512, E = 8 and 64
    python bench/moe.py --quick    # small shapes (a smoke run, seconds)

Top-2 of E experts of width f does the matmul work of one dense SwiGLU of width 2f, so the dense layer is the
yardstick: MoE / dense is what routing, sorting and the grouped matmul cost on top. Each step is the gradient of
sum(y * cotangent) (+ the MoE auxiliary losses at the trainer's default weights) with respect to the layer's
parameters and its input. Every variant runs once per round, in a rotated order; the table gives the median wall
time and the median over rounds of the time relative to the dense layer of the same round, and the same for the
process's CPU time (on a shared machine wall time depends on the other jobs; CPU time much less so).

Variants: each grouped-matmul implementation (`blocked`, `ragged`) of the dropless layer, and capacity mode
(capacity_factor 1.25, dense per-expert buffers). XLA:CPU computes ragged_dot as a masked product over every expert
(E / top_k times the active FLOPs): by default it runs only in the first case with E <= 8 (--ragged-all: all).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mm15_jax import machine  # noqa: E402
from mm15_jax.config import MoEConfig  # noqa: E402
from mm15_jax.models import layers  # noqa: E402
from mm15_jax.models.moe import MoEFeedForward  # noqa: E402

TOP_K = 2
CAPACITY_FACTOR = 1.25
LOAD_BALANCE_WEIGHT, Z_LOSS_WEIGHT = MoEConfig.load_balance_weight, MoEConfig.z_loss_weight
# (tokens, d_model, expert width f, experts); the dense FFN has width TOP_K * f.
FULL_CASES = [(8192, 256, 256, 8), (8192, 256, 256, 64), (16384, 512, 256, 8), (16384, 512, 256, 64)]
QUICK_CASES = [(1024, 64, 64, 8), (1024, 64, 32, 64)]


def build(variant: str, d_model: int, expert_width: int, num_experts: int):
  """(module, loss(module, x, cotangent)) for "dense" or an MoE variant ("blocked", "ragged", "capacity")."""
  kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  if variant == "dense":
    module = layers.SwiGLU(d_model, TOP_K * expert_width, **kw)
    return module, lambda m, x, ct: jnp.sum(m(x) * ct)
  cfg = MoEConfig(num_experts=num_experts, top_k=TOP_K, every=1, ffn_dim=expert_width,
                  capacity_factor=CAPACITY_FACTOR if variant == "capacity" else 0.0,
                  grouped_matmul="blocked" if variant == "capacity" else variant)
  module = MoEFeedForward(d_model, expert_width, cfg, **kw)

  def loss(m, x, ct):
    y, aux = m(x)
    return (jnp.sum(y * ct) + LOAD_BALANCE_WEIGHT * aux["moe_load_balance_loss"]
            + Z_LOSS_WEIGHT * aux["moe_z_loss"])

  return module, loss


def active_matmul_flops(module) -> int:
  """Forward matmul FLOPs per token of the FFN proper, from the parameter shapes (the router is counted apart)."""
  if isinstance(module, MoEFeedForward):
    expert = sum(2 * int(np.prod(getattr(module, n).shape[1:])) for n in ("gate", "up", "down"))
    return module.top_k * expert
  return sum(2 * int(np.prod(getattr(module, n).shape)) for n in ("gate", "up", "down"))


def router_flops(module) -> int:
  return 2 * int(np.prod(module.router.shape)) if isinstance(module, MoEFeedForward) else 0


def grad_step(module, loss):
  """jit(value and gradient w.r.t. parameters and input) and the parameter state."""
  graphdef, state = nnx.split(module)

  def f(state, x, ct):
    return loss(nnx.merge(graphdef, state), x, ct)

  return jax.jit(jax.value_and_grad(f, argnums=(0, 1))), state


def run_case(tokens: int, d_model: int, width: int, experts: int, *, rounds: int, with_ragged: bool) -> list[dict]:
  variants = ["dense", "blocked", "capacity"]
  if with_ragged:
    variants.insert(2, "ragged")
  x = jax.random.normal(jax.random.key(1), (1, tokens, d_model), jnp.float32)
  ct = jax.random.normal(jax.random.key(2), (1, tokens, d_model), jnp.float32)
  steps, rows, grads = {}, {}, {}
  for v in variants:
    module, loss = build(v, d_model, width, experts)
    fn, state = grad_step(module, loss)
    start = time.perf_counter()
    value, (g_state, g_x) = jax.block_until_ready(fn(state, x, ct))  # compile + first run
    finite = bool(np.isfinite(float(value)) and all(np.isfinite(np.asarray(g)).all()
                                                     for g in jax.tree.leaves((g_state, g_x))))
    steps[v] = (fn, state)
    grads[v] = g_x
    rows[v] = {"variant": v, "tokens": tokens, "d_model": d_model, "expert_width": width, "experts": experts,
               "active_matmul_flops_per_token": active_matmul_flops(module), "router_flops_per_token":
               router_flops(module), "first_call_s": round(time.perf_counter() - start, 3), "finite": finite,
               "times_s": [], "cpu_times_s": []}
  for r in range(rounds):
    order = variants[r % len(variants):] + variants[:r % len(variants)]
    for v in order:
      fn, state = steps[v]
      start, cpu_start = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(state, x, ct))
      rows[v]["times_s"].append(time.perf_counter() - start)
      rows[v]["cpu_times_s"].append(time.process_time() - cpu_start)
  if "ragged" in rows:  # the two dropless kernels on the same routing: equal up to float rounding
    diff = jnp.abs(grads["ragged"] - grads["blocked"]).max() / jnp.abs(grads["ragged"]).max()
    rows["ragged"]["input_grad_max_rel_diff_vs_blocked"] = float(diff)
  for clock, prefix in (("times_s", ""), ("cpu_times_s", "cpu_")):
    dense_t = np.asarray(rows["dense"][clock])
    for row in rows.values():
      t = np.asarray(row[clock])
      row[f"{prefix}median_ms"] = round(1e3 * float(np.median(t)), 2)
      row[f"{prefix}ratio_to_dense"] = round(float(np.median(t / dense_t)), 3)
      row[clock] = [round(float(s), 4) for s in t]
  return list(rows.values())


def table(rows: list[dict]) -> str:
  lines = ["| tokens | d_model | E | f (dense 2f) | variant | wall ms | wall / dense | CPU ms | CPU / dense |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['tokens']} | {r['d_model']} | {r['experts']} | {r['expert_width']} | {r['variant']} | "
                 f"{r['median_ms']:.1f} | {r['ratio_to_dense']:.2f} | {r['cpu_median_ms']:.1f} | "
                 f"{r['cpu_ratio_to_dense']:.2f} |")
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  argv = sys.argv[1:] if argv is None else list(argv)
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="small shapes, 3 rounds")
  p.add_argument("--rounds", type=int, default=0, help="timed rounds (default 7, 3 with --quick)")
  p.add_argument("--ragged-all", action="store_true", help="time ragged_dot in every case (slow on CPU)")
  a = p.parse_args(argv)
  rounds = a.rounds or (3 if a.quick else 7)
  rows, ragged_done = [], False
  for case in QUICK_CASES if a.quick else FULL_CASES:
    with_ragged = a.ragged_all or (case[3] <= 8 and not ragged_done)
    ragged_done |= with_ragged
    rows += run_case(*case, rounds=rounds, with_ragged=with_ragged)
    print(f"case {case} done", file=sys.stderr, flush=True)
  print(table(rows))
  print("Medians over rounds, measured on a shared machine under load: compare ratios within a run, not times "
        "across runs. CPU = this process's CPU time (all threads), less sensitive to other jobs than wall time.")
  print(json.dumps({"bench": "moe", **machine.describe(" ".join(["python", "bench/moe.py", *argv])), "rounds": rounds, "rows": rows}))
  return rows


if __name__ == "__main__":
  main()
