"""Evaluation of a model on benchmarks: greedy answers, the paper's metrics, category scores, MMBase, a blind baseline.

`evaluate_params` scores a model in memory (the trainer can call it during a stage); `evaluate_checkpoint` restores
a checkpoint, evaluates and writes report.json, categories.png and predictions.jsonl. Scores are fractions in
[0, 1]; the printed table shows percentages like the paper.

The blind baseline answers every question of a benchmark with the most frequent answer of that benchmark's
training split (when the dataset has one); beating it shows the model reads the image, not only the language prior.
"""
from __future__ import annotations

import collections
import dataclasses
import json
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from mm15_jax import layout, paths, sharding
from mm15_jax.config import DataConfig, Experiment, ModelConfig, StageConfig
from mm15_jax.data import records
from mm15_jax.data import samples as samples_lib
from mm15_jax.data.tokenizer import MAX_GRID_SIDE, Tokenizer
from mm15_jax.eval import generate, metrics, report as report_lib, suites, summaries
from mm15_jax.train import state as state_lib

SHOWN_EXAMPLES = 5  # predictions kept per benchmark in the report


def load_model(directory: str, mesh, seed: int = 0):
  """(model, model config) from a checkpoint directory, parameters restored onto `mesh`."""
  model_cfg, graphdef, params, rest = state_lib.restore_model_params(directory, mesh, seed)
  return nnx.merge(graphdef, params, rest), model_cfg


def last_answer(record: dict) -> str:
  return next((m["content"] for m in reversed(record["messages"]) if m["role"] == "assistant"), "")


def blind_answer(benchmark: suites.Benchmark) -> str | None:
  """The most frequent final answer of the benchmark's training split; None when it has none."""
  if not suites.has_train_split(benchmark.source):
    return None
  source = benchmark.source
  counts = collections.Counter(last_answer(r) for r in records.open_source(source.data_dir, source.name, "train"))
  counts.pop("", None)
  return counts.most_common(1)[0][0] if counts else None


def eval_spec(data_cfg: DataConfig, *, tile_size: int, tokens_per_tile: int,
              n_max: int | None = None) -> samples_lib.SampleSpec:
  """The sample spec of evaluation prompts: the stage's, with room for the tiles of a larger inference `n_max`.

  `n_max` raises the dynamic split's largest grid (the paper evaluates with (4, 16)); n_min is never lowered, since
  grounding collapses when it is.
  """
  spec = samples_lib.SampleSpec.from_config(data_cfg, tile_size=tile_size, tokens_per_tile=tokens_per_tile)
  if n_max is None:
    return spec
  split = data_cfg.split
  if split.mode != "dynamic":
    raise ValueError(f"n_max={n_max} applies to the dynamic split, but the stage's split.mode is {split.mode!r}")
  if not split.n_min <= n_max <= MAX_GRID_SIDE:
    raise ValueError(f"n_max={n_max} must be in [split.n_min={split.n_min}, {MAX_GRID_SIDE}] (n_min is never "
                     "lowered at inference)")
  tiles = split.max_images_to_split * (n_max + int(split.overview))
  return dataclasses.replace(spec, max_images=max(spec.max_images, tiles))


def answer(model, tokenizer: Tokenizer, spec: samples_lib.SampleSpec, recs: Sequence[dict], *, batch_size: int,
           max_new_tokens: int, n_max: int | None = None, tile_slots: int | None = None,
           where: str = "eval") -> list[str]:
  """Greedy answers for sft records, in batches of right-padded prompts.

  Shapes are fixed so that every batch runs one compiled program: `tile_slots` (default spec.max_images) image
  slots per row, or spec.max_images for a batch that needs more (a larger inference n_max).
  """
  outputs = []
  for start in range(0, len(recs), batch_size):
    chunk = recs[start:start + batch_size]
    prompts = [samples_lib.encode_prompt(r, tokenizer, spec, n_max=n_max, where=f"{where}[{start + i}]")
               for i, r in enumerate(chunk)]
    rows = batch_size  # fixed shapes: one compile for every batch
    length = spec.seq_len
    slots = min(tile_slots or spec.max_images, spec.max_images)
    max_tiles = slots if max(p.n_tiles for p in prompts) <= slots else spec.max_images
    tokens = np.full((rows, length), tokenizer.pad_id, np.int32)
    images = np.zeros((rows, max_tiles, spec.tile_size, spec.tile_size, 3), np.uint8)
    image_mask = np.zeros((rows, max_tiles), bool)
    # As in training: enlargements left to the model (data.split.enlarge_on_device).
    extent = np.zeros((rows, max_tiles, 4), np.int32) if spec.split.enlarge_on_device else None
    lengths = np.ones((rows,), np.int32)
    for i, prompt in enumerate(prompts):
      ids, n = prompt.ids, prompt.n_tiles
      if len(ids) + max_new_tokens > length:
        raise ValueError(f"{where}[{start + i}]: prompt of {len(ids)} tokens leaves no room for {max_new_tokens} "
                         f"new tokens in seq_len {length}")
      tokens[i, :len(ids)] = ids
      prompt.write_tiles(images[i, :n], None if extent is None else extent[i, :n])
      image_mask[i, :n] = True
      lengths[i] = len(ids)
    new = generate.greedy_generate(model, tokens, images, image_mask, prompt_lengths=lengths,
                                   image_token_id=tokenizer.image_id, eos_id=tokenizer.end_id,
                                   max_new_tokens=max_new_tokens, image_extent=extent,
                                   live_rows=np.arange(rows) < len(chunk))
    new = np.asarray(jax.device_get(new))
    for i in range(len(chunk)):
      ids = list(new[i])
      ids = ids[:ids.index(tokenizer.end_id)] if tokenizer.end_id in ids else ids
      outputs.append(tokenizer.decode(ids).strip())
  return outputs


def _question(record: dict) -> str:
  """The last user turn: the question asked (after any few-shot support turns)."""
  return next(m["content"] for m in reversed(record["messages"]) if m["role"] == "user")


def evaluate_params(model, tokenizer: Tokenizer, data_cfg: DataConfig, *, tile_size: int, tokens_per_tile: int,
                    benchmarks: Sequence[suites.Benchmark], n_max: int | None = None, max_examples: int = 0,
                    batch_size: int = 16, max_new_tokens: int = 24, predictions_path: str | None = None,
                    log=print) -> dict:
  """Scores `model` (in memory) on `benchmarks`; call inside the mesh the model's parameters live on.

  Returns {"benchmarks": {name: {score, baseline, n, metric, category, blind_answer, examples}},
           "categories": {category: {score, baseline}}, "mmbase": float | None, "table": {category: [names]}}.
  A baseline is None where the benchmark has no training split. `predictions_path` (optional) receives one JSON
  line per example: benchmark, index, question, prediction, answers, score.
  """
  if not benchmarks:
    raise ValueError("evaluate_params: no benchmarks given")
  table = suites.category_table(benchmarks)  # checks categories before any generation
  spec = eval_spec(data_cfg, tile_size=tile_size, tokens_per_tile=tokens_per_tile, n_max=n_max)
  results, lines = {}, []
  for b in benchmarks:
    recs = b.examples(max_examples)
    preds = answer(model, tokenizer, spec, recs, batch_size=batch_size, max_new_tokens=max_new_tokens,
                   n_max=n_max, tile_slots=data_cfg.max_images, where=f"benchmark {b.name}")
    scores = metrics.corpus_scores(b.metric, preds, [r["answers"] for r in recs])
    summary = summaries.summarize(b.metric, recs, scores, preds)
    blind = blind_answer(b)
    baseline = None if blind is None else summaries.summarize(
        b.metric, recs, metrics.corpus_scores(b.metric, [blind] * len(recs), [r["answers"] for r in recs]),
        [blind] * len(recs))["score"]
    results[b.name] = {
        "score": float(summary["score"]), "baseline": baseline, "n": len(recs), "metric": b.metric,
        "category": b.category, "blind_answer": blind, "source": str(b.source), "details": summary["details"],
        "examples": [{"question": _question(r), "prediction": p, "answers": r["answers"]}
                     for p, r in zip(preds[:SHOWN_EXAMPLES], recs)]}
    lines += [{"benchmark": b.name, "index": i, "question": _question(r), "prediction": p, "answers": r["answers"],
               "score": s} for i, (p, r, s) in enumerate(zip(preds, recs, scores))]
    shown = "none" if baseline is None else f"{baseline:.3f}"
    log(f"[eval] {b.name} ({b.category}): {b.metric} {results[b.name]['score']:.3f} (blind baseline {shown}, "
        f"n={len(recs)})")
  averages = report_lib.category_averages({n: r["score"] for n, r in results.items()}, table)
  categories = {}
  for category, score in averages.items():
    baselines = [r["baseline"] for r in results.values() if r["category"] == category and r["baseline"] is not None]
    categories[category] = {"score": score, "baseline": float(np.mean(baselines)) if baselines else None}
  if predictions_path and jax.process_index() == 0:
    target = paths.path(predictions_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
  return {"benchmarks": results, "categories": categories, "mmbase": report_lib.mmbase(averages), "table": table}


def write_outputs(result: dict, out_dir: str, *, title: str = "", **extra) -> dict:
  """report.json (report.build_report layout, per-benchmark details under "details") and categories.png."""
  report = report_lib.write_report(paths.join(out_dir, "report.json"),
                                   {n: b["score"] for n, b in result["benchmarks"].items()}, result["table"],
                                   details=result["benchmarks"],
                                   baselines={c: v["baseline"] for c, v in result["categories"].items()}, **extra)
  baselines = {c: v["baseline"] for c, v in result["categories"].items() if v["baseline"] is not None}
  report_lib.write_category_chart(paths.join(out_dir, "categories.png"),
                                  {c: v["score"] for c, v in result["categories"].items()}, baselines or None,
                                  labels=("model", "blind baseline"), title=title)
  return report


def evaluate_checkpoint(exp: Experiment, checkpoint: str, *, out_dir: str, stage: int | str = -1,
                        data_dir: str = "", benchmarks: str | Sequence[str] | None = None, n_max: int | None = None,
                        max_examples: int = 0, batch_size: int = 16, max_new_tokens: int = 24, log=print) -> dict:
  """Restores the checkpoint (its latest step) and evaluates it on benchmarks of `data_dir`; writes `out_dir`.

  Data settings (tokenizer, tile size, split, sequence length) are those of `exp`'s stage `stage` (index or name;
  default the last); `data_dir` defaults to that stage's. `benchmarks`: names (default: every "test" split).
  """
  stage_cfg = _stage(exp, stage)
  data_cfg = stage_cfg.data
  paths.ensure_writable_dir(out_dir)  # a missing bucket or permission stops here, not after the evaluation
  selected = suites.select(data_dir or data_cfg.data_dir, benchmarks)
  mesh = sharding.make_mesh(exp.mesh)
  model, model_cfg = load_model(checkpoint, mesh, exp.seed)
  tokenizer = Tokenizer(data_cfg.tokenizer)
  with sharding.use_mesh(mesh):
    result = evaluate_params(model, tokenizer, data_cfg, tile_size=stage_cfg.image_size,
                             tokens_per_tile=model_cfg.tokens_per_tile, benchmarks=selected, n_max=n_max,
                             max_examples=max_examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             predictions_path=paths.join(out_dir, "predictions.jsonl"), log=log)
  if jax.process_index() == 0:
    write_outputs(result, out_dir, title=f"{exp.name}: benchmark categories", checkpoint=paths.absolute(checkpoint),
                  inference_n_max=n_max, max_examples=max_examples)
  return result


def evaluate_workdir(exp: Experiment, workdir: str, *, stage: int | str = -1, **kwargs) -> dict:
  """`evaluate_checkpoint` on the final checkpoint of a stage of `workdir` (default the last); writes workdir/eval/."""
  checkpoint = layout.checkpoint_dir(workdir, _stage(exp, stage))
  return evaluate_checkpoint(exp, checkpoint, out_dir=layout.eval_dir(workdir), stage=stage, **kwargs)


def periodic_eval(model, tokenizer: Tokenizer, stage: StageConfig, model_cfg: ModelConfig, log) -> dict[str, float]:
  """The held-out evaluation inside the training loop (runner.run_stage's `evaluate`) -> scalars
  "eval/<benchmark>", "eval/<category>"."""
  result = evaluate_params(
      model, tokenizer, stage.data, tile_size=stage.image_size, tokens_per_tile=model_cfg.tokens_per_tile,
      benchmarks=suites.select(stage.data.data_dir, stage.eval_benchmarks or None),
      max_examples=stage.eval_max_examples, log=log)
  scalars = {f"eval/{n}": b["score"] for n, b in result["benchmarks"].items()}
  scalars.update({f"eval/{c}": v["score"] for c, v in result["categories"].items()})
  return scalars


def _stage(exp: Experiment, stage: int | str):
  names = [s.name for s in exp.stages]
  if isinstance(stage, str):
    if stage not in names:
      raise ValueError(f"unknown stage {stage!r}; the experiment has {names}")
    return exp.stages[names.index(stage)]
  return exp.stages[stage]


def format_table(result: dict) -> str:
  """The per-benchmark and per-category scores (percent) as a text table, then MMBase."""
  pct = lambda v: "     -" if v is None else f"{100 * v:6.1f}"
  rows = [f"{'benchmark':<20} {'category':<14} {'metric':<8} {'n':>6} {'score':>6} {'blind':>6}"]
  for name, b in result["benchmarks"].items():
    rows.append(f"{name:<20} {b['category']:<14} {b['metric']:<8} {b['n']:>6} {pct(b['score'])} {pct(b['baseline'])}")
    details = b.get("details") or {}
    if "total" in details:  # MME's own reading: summed subtask scores
      rows.append(f"  MME score {details['total']:.1f} (perception {details['perception']:.1f}, cognition "
                  f"{details['cognition']:.1f})")
    for split, v in (details.get("splits") or {}).items():
      rows.append(f"  {split}: accuracy {100 * v['accuracy']:.1f} precision {100 * v['precision']:.1f} recall "
                  f"{100 * v['recall']:.1f} F1 {100 * v['f1']:.1f}")
  rows.append("")
  rows.append(f"{'category':<20} {'':<14} {'':<8} {'':>6} {'score':>6} {'blind':>6}")
  for name, c in result["categories"].items():
    rows.append(f"{name:<20} {'':<14} {'':<8} {'':>6} {pct(c['score'])} {pct(c['baseline'])}")
  mmbase = result["mmbase"]
  rows.append("")
  rows.append(f"MMBase {pct(mmbase).strip()}" if mmbase is not None else
              f"MMBase - (needs {', '.join(report_lib.MMBASE_CATEGORIES)})")
  return "\n".join(rows)
