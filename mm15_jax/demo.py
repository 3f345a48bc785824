"""`mm15 demo`: synthetic corpus -> pretrain -> OCR continual pretrain -> SFT -> held-out evaluation, on CPU."""
from __future__ import annotations

import json
import time

from mm15_jax import paths
from mm15_jax.configs import tiny


def run(workdir: str, *, scale: float = 1.0, seed: int = 0, overrides: list[str] = (),
        max_eval_examples: int = 0) -> dict:
  """`scale` multiplies the corpus size and every stage's steps; `overrides` are `--set` strings."""
  from mm15_jax import config as config_lib
  from mm15_jax.data import synth
  from mm15_jax.eval import run as eval_run
  from mm15_jax.train import runner

  t0 = time.perf_counter()
  data_dir = paths.join(workdir, "data")
  if not paths.path(data_dir).joinpath("corpus.json").exists():
    print(f"[demo] building the synthetic corpus in {data_dir}")
    synth.build_corpus(data_dir, seed=seed, scale=scale)
  else:
    print(f"[demo] reusing the synthetic corpus in {data_dir}")
  exp = config_lib.override(tiny.get_config(data_dir=data_dir, scale=scale), list(overrides))
  exp.seed = seed
  stages = [runner.run_stage(exp, i, workdir, evaluate=eval_run.periodic_eval) for i in range(len(exp.stages))]
  report = eval_run.evaluate_workdir(exp, workdir, max_examples=max_eval_examples)
  summary = {"stages": stages, "eval": report, "seconds": time.perf_counter() - t0}
  paths.path(workdir).joinpath("summary.json").write_text(json.dumps(summary, indent=2))
  print_summary(summary)
  return summary


def print_summary(summary: dict) -> None:
  print("\nstage        steps   loss first -> last   time")
  for s in summary["stages"]:
    print(f"{s['name']:<12} {s['steps']:>5}   {s['loss_first']:>8.3f} -> {s['loss_last']:<8.3f} {s['seconds']:>6.0f}s")
  print("\ncategory       score   blind baseline")
  for name, c in summary["eval"]["categories"].items():
    print(f"{name:<14} {c['score']:>6.3f}   {c['baseline']:>6.3f}")
  print(f"\ntotal {summary['seconds']:.0f}s; details in summary.json, TensorBoard logs under each stage's folder")
