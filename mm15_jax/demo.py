"""`mm15 demo`: synthetic corpus -> pretrain -> OCR continual pretrain -> SFT -> held-out evaluation, on CPU.

`--variant video` / `--variant ui` then continue the image demo's SFT checkpoint (running the image demo first when
WORKDIR has none) on the synthetic video clips or mobile-UI screens, as MM1.5-Video and MM1.5-UI continue MM1.5:
their datasets are added to WORKDIR/data (same tokenizer), the stage trains in WORKDIR/<variant>/ and is evaluated
there against the blind baseline; the video variant also scores the image model on the clips without training
(MM1.5-Video's training-free form).
"""
from __future__ import annotations

import json
import time

from mm15_jax import layout, paths
from mm15_jax.configs import tiny

VARIANTS = ("image", "video", "ui")
# The image demo scores its three held-out sets every 100 SFT steps: a learning curve per category.
CURVE_OVERRIDES = ("stages.sft.eval_every=100", "stages.sft.eval_max_examples=50",
                   "stages.sft.eval_benchmarks=sft_general,sft_text_rich,sft_refer_ground")
# Screen descriptions run to about 30 tokens.
VARIANT_MAX_NEW_TOKENS = {"image": 24, "video": 8, "ui": 64}


def run(workdir: str, *, variant: str = "image", scale: float = 1.0, seed: int = 0, overrides: list[str] = (),
        max_eval_examples: int = 0, max_new_tokens: int = 0) -> dict:
  """`scale` multiplies the corpus size and every stage's steps; `overrides` are `--set` strings (of the variant's
  experiment for video and ui); `max_eval_examples` / `max_new_tokens` bound the final evaluation (0: every
  held-out example / the variant's VARIANT_MAX_NEW_TOKENS)."""
  if variant not in VARIANTS:
    raise ValueError(f"demo variant {variant!r}: expected one of {list(VARIANTS)}")
  if variant == "image":
    return run_image(workdir, scale=scale, seed=seed, overrides=overrides, max_eval_examples=max_eval_examples,
                     max_new_tokens=max_new_tokens)
  return run_variant(workdir, variant, scale=scale, seed=seed, overrides=overrides,
                     max_eval_examples=max_eval_examples, max_new_tokens=max_new_tokens)


def run_image(workdir: str, *, scale: float = 1.0, seed: int = 0, overrides: list[str] = (),
              max_eval_examples: int = 0, max_new_tokens: int = 0) -> dict:
  from mm15_jax import config as config_lib
  from mm15_jax.data import synth
  from mm15_jax.eval import run as eval_run
  from mm15_jax.train import runner

  t0 = time.perf_counter()
  data_dir = paths.join(workdir, "data")
  if not paths.path(data_dir).joinpath(synth.CORPUS_FILE).exists():
    print(f"[demo] building the synthetic corpus in {data_dir}")
    synth.build_corpus(data_dir, seed=seed, scale=scale)
  else:
    print(f"[demo] reusing the synthetic corpus in {data_dir}")
  exp = config_lib.override(tiny.get_config(data_dir=data_dir, scale=scale), [*CURVE_OVERRIDES, *overrides])
  exp.seed = seed
  stages = [runner.run_stage(exp, i, workdir, evaluate=eval_run.periodic_eval) for i in range(len(exp.stages))]
  report = eval_run.evaluate_workdir(exp, workdir, max_examples=max_eval_examples,
                                     max_new_tokens=max_new_tokens or VARIANT_MAX_NEW_TOKENS["image"])
  return _finish(workdir, {"variant": "image", "stages": stages, "eval": report,
                           "seconds": time.perf_counter() - t0})


def variant_experiment(variant: str, data_dir: str, init_from: str, scale: float):
  from mm15_jax.configs import tiny_ui, tiny_video
  if variant == "video":
    return tiny_video.get_config(data_dir=data_dir, init_from=init_from, scale=scale)
  return tiny_ui.get_config(data_dir=data_dir, init_from=init_from, scale=scale)


def run_variant(workdir: str, variant: str, *, scale: float = 1.0, seed: int = 0, overrides: list[str] = (),
                max_eval_examples: int = 0, max_new_tokens: int = 0) -> dict:
  """The image demo's SFT checkpoint (trained here first if absent) -> the variant's stage -> its evaluation."""
  from mm15_jax import config as config_lib
  from mm15_jax.data import synth
  from mm15_jax.eval import run as eval_run
  from mm15_jax.train import runner

  t0 = time.perf_counter()
  data_dir = paths.join(workdir, "data")
  image_checkpoint = layout.checkpoint_dir(workdir, tiny.get_config(data_dir=data_dir).stages[-1])
  if not _has_checkpoint(image_checkpoint):
    print(f"[demo] no image demo checkpoint in {image_checkpoint}: running the image demo first")
    run_image(workdir, scale=scale, seed=seed, max_eval_examples=max_eval_examples, max_new_tokens=max_new_tokens)
  corpus = json.loads(paths.path(data_dir).joinpath(synth.CORPUS_FILE).read_text())
  if f"{variant}_datasets" in corpus:
    print(f"[demo] reusing the {variant} datasets in {data_dir}")
  else:
    print(f"[demo] adding the synthetic {variant} datasets to {data_dir}")
    add = synth.build_video_corpus if variant == "video" else synth.add_ui_datasets
    corpus = add(data_dir, seed=corpus["seed"], scale=corpus["scale"])  # corpus.json as it now is
  exp = config_lib.override(variant_experiment(variant, data_dir, image_checkpoint, scale), list(overrides))
  exp.seed = seed
  variant_dir = paths.join(workdir, variant)
  benchmarks = [name for name, splits in corpus[f"{variant}_datasets"].items() if "test" in splits]
  eval_options = dict(benchmarks=benchmarks, max_examples=max_eval_examples,
                      max_new_tokens=max_new_tokens or VARIANT_MAX_NEW_TOKENS[variant])
  summary = {"variant": variant}
  if variant == "video":  # the image model on frames, untrained on video
    print("[demo] training-free: the image model on the held-out clips")
    summary["training_free"] = eval_run.evaluate_checkpoint(
        exp, image_checkpoint, out_dir=paths.join(variant_dir, "training_free"), **eval_options)
  summary["stages"] = [runner.run_stage(exp, 0, variant_dir)]
  summary["eval"] = eval_run.evaluate_workdir(exp, variant_dir, **eval_options)
  summary["seconds"] = time.perf_counter() - t0
  return _finish(variant_dir, summary)


def _has_checkpoint(directory: str) -> bool:
  from mm15_jax.train import checkpoint as ckpt_lib
  try:
    ckpt_lib.newest_intact_step(directory)
  except FileNotFoundError:
    return False
  return True


def _finish(out_dir: str, summary: dict) -> dict:
  paths.path(out_dir).joinpath("summary.json").write_text(json.dumps(summary, indent=2))
  print_summary(summary)
  return summary


def _example(report: dict, category: str) -> dict | None:
  """The first held-out example of the category's first benchmark."""
  for bench in report["benchmarks"].values():
    if bench["category"] == category and bench.get("examples"):
      return bench["examples"][0]
  return None


def print_summary(summary: dict) -> None:
  print("\nstage        steps   loss first -> last   time")
  for s in summary["stages"]:
    print(f"{s['name']:<12} {s['steps']:>5}   {s['loss_first']:>8.3f} -> {s['loss_last']:<8.3f} {s['seconds']:>6.0f}s")
  free = summary.get("training_free", {}).get("categories", {})
  print("\ncategory       score   blind baseline" + ("   training-free" if free else ""))
  for name, c in summary["eval"]["categories"].items():
    baseline = "   n/a" if c["baseline"] is None else f"{c['baseline']:>6.3f}"
    extra = f"   {free[name]['score']:>13.3f}" if name in free else ""
    print(f"{name:<14} {c['score']:>6.3f}   {baseline}{extra}")
  print("\none held-out example per category")
  for name in summary["eval"]["categories"]:
    ex = _example(summary["eval"], name)
    if ex is not None:
      question = " ".join(ex["question"].split())
      print(f"{name:<14} Q: {question[:90]}\n{'':<14} model: {ex['prediction']!r}   answer: {ex['answers'][0]!r}")
  print(f"\ntotal {summary['seconds']:.0f}s; details in summary.json, TensorBoard logs under each stage's folder")
