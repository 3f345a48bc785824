"""Runs one stage of an experiment: the same loop for pretraining, OCR continual pretraining and SFT.

A stage restarts from its own newest complete checkpoint without being told (preemption), else initialises from
`init_from`: "" (random), "previous" (the stage before, position embeddings resized to this stage's image size) or a
checkpoint directory (e.g. imported Hugging Face weights).
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from mm15_jax import config as config_lib
from mm15_jax import layout, paths
from mm15_jax import sharding
from mm15_jax.config import Experiment, ModelConfig, StageConfig
from mm15_jax.data import mixture as mixture_lib
from mm15_jax.data import pipeline as pipeline_lib
from mm15_jax.data.tokenizer import Tokenizer
from mm15_jax.models import upcycle, vit
from mm15_jax.train import checkpoint as ckpt_lib
from mm15_jax.train import distributed
from mm15_jax.train import epochs as epochs_lib
from mm15_jax.train import flops as flops_lib
from mm15_jax.train import lock
from mm15_jax.train import optim
from mm15_jax.train import profile as profile_lib
from mm15_jax.train import stage as stage_lib
from mm15_jax.train import state as state_lib
from mm15_jax.train import wandb_log
from mm15_jax.train.logs import MetricsWriter, Progress


class NonFiniteError(RuntimeError):
  pass


# A periodic evaluation: (model, tokenizer, stage, model config, log) -> scalars to log (e.g. "eval/<benchmark>").
Evaluate = Callable[[Any, Tokenizer, StageConfig, ModelConfig, Callable], dict[str, float]]


def initial_params(exp: Experiment, index: int, workdir: str, model_cfg: ModelConfig, mesh, log):
  """(graphdef, params, rest) for the start of stage `index`."""
  stage = exp.stages[index]
  source = stage.init_from
  if source == "previous":
    if index == 0:
      raise ValueError(f"config key stages.{stage.name}.init_from='previous' but it is the first stage")
    source = layout.checkpoint_dir(workdir, exp.stages[index - 1])
  if not source:
    log(f"[{stage.name}] random initialisation (seed {exp.seed})")
    return state_lib.init_params(model_cfg, mesh, exp.seed)
  saved_cfg, graphdef, like, rest = state_lib.restore_model_params(source, mesh, exp.seed)
  log(f"[{stage.name}] initialising from {source} (encoder at {saved_cfg.vision.image_size}px)")
  if saved_cfg.vision.image_size != model_cfg.vision.image_size:
    model = nnx.merge(graphdef, like, rest)
    vit.resize_image_size(model, model_cfg.vision.image_size)  # e.g. position embeddings 378 -> 672
    like = nnx.state(model, nnx.Param)
  if saved_cfg.decoder.moe is None and model_cfg.decoder.moe is not None:  # dense -> MoE: experts copy the FFNs
    where = f"config key stages.{stage.name}.init_from={source!r}"
    upcycle.check_compatible(saved_cfg.decoder, model_cfg.decoder, where)
    log(f"[{stage.name}] upcycling the dense decoder: {model_cfg.decoder.moe.num_experts} experts per MoE layer")
    _, fresh, _ = state_lib.init_params(model_cfg, mesh, exp.seed)
    like = upcycle.upcycle_params(like, fresh, saved_cfg.decoder, model_cfg.decoder, where=where)
  # Rebuild under this stage's config so the graph is exactly that of a fresh model of this stage.
  graphdef, params, _ = state_lib.abstract_model(model_cfg, exp.seed)
  state_lib.check_shapes(params, like, f"config key stages.{stage.name}.init_from={source!r}")
  shardings = sharding.param_shardings(params, mesh)
  nnx.replace_by_pure_dict(params, nnx.to_pure_dict(like))
  params = jax.device_put(params, shardings)
  return graphdef, params, rest


def data_iterator(exp: Experiment, index: int, tokenizer: Tokenizer, model_cfg: ModelConfig, sources: dict,
                  data_hosts: int | None = None):
  """(this process's checkpointable iterator of `Batch`es over the opened `sources`, source names in the order of
  source_ids)."""
  stage = exp.stages[index]
  if stage.batch_size % (jax.process_count() * stage.grad_accum):
    raise ValueError(f"config key stages.{stage.name}.batch_size={stage.batch_size} must divide by process count "
                     f"x grad_accum = {jax.process_count() * stage.grad_accum}")
  host_pipeline = lambda process_index, process_count: pipeline_lib.make_pipeline(
      stage.data, sources=sources, tokenizer=tokenizer, tokens_per_tile=model_cfg.tokens_per_tile,
      tile_size=stage.image_size, batch_size=stage.batch_size // process_count, process_index=process_index,
      process_count=process_count, seed=exp.seed)
  if data_hosts is None or data_hosts == jax.process_count():
    return host_pipeline(jax.process_index(), jax.process_count()), sorted(sources)
  if jax.process_count() != 1 or data_hosts < 1 or stage.batch_size % (data_hosts * stage.grad_accum):
    raise ValueError(f"data_hosts={data_hosts} needs a single process and stages.{stage.name}.batch_size="
                     f"{stage.batch_size} divisible by data_hosts x grad_accum")
  return pipeline_lib.ConcatenatedHosts(host_pipeline(p, data_hosts) for p in range(data_hosts)), sorted(sources)


@lock.holds_workdir
def run_stage(exp: Experiment, index: int, workdir: str, *, log=print, data_hosts: int | None = None,
              evaluate: Evaluate | None = None) -> dict:
  """Trains stage `index` of `exp` in `workdir/<stage name>`; returns the summary (also in summary.json).

  `data_hosts`: how many per-host data shards make up the global batch (default: the process count). Only a single
  process may set it, to read the shards of `data_hosts` hosts itself: it then sees the very batches that a run of
  that many processes sees (a multi-host run reproduced on one process). `evaluate`: the periodic evaluation run
  every stages.<name>.eval_every steps (eval.run.periodic_eval).
  """
  stage = exp.stages[index]
  stage = dataclasses.replace(stage, data=mixture_lib.resolve_sft(stage.data, log=log))  # data.sft -> data.mixture
  exp = dataclasses.replace(exp, stages=[*exp.stages[:index], stage, *exp.stages[index + 1:]])
  if stage.eval_every and evaluate is None:
    raise ValueError(f"config key stages.{stage.name}.eval_every={stage.eval_every} but this program trains without "
                     f"evaluation: set it to 0")
  wandb_log.require_installed(exp.logging)  # before anything is read or compiled
  out_dir = layout.stage_dir(workdir, stage)
  paths.ensure_writable_dir(out_dir)  # a missing bucket or permission stops here, before anything is written
  tokenizer = Tokenizer(stage.data.tokenizer)
  mesh = sharding.make_mesh(exp.mesh)
  log(f"[{stage.name}] mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices, "
      f"{jax.process_count()} process(es)")
  model_cfg = stage_lib.stage_model_config(exp.model, stage, tokenizer.vocab_size)
  sources = pipeline_lib.open_sources(stage.data, split="train")
  data_iter, source_names = data_iterator(exp, index, tokenizer, model_cfg, sources, data_hosts)

  checkpointer = ckpt_lib.Checkpointer(layout.checkpoint_dir(workdir, stage), keep=stage.keep_checkpoints,
                                       keep_period=stage.keep_every or None)
  start = checkpointer.latest_step() or 0
  probe = lambda rows: iter(pipeline_lib.make_dataset(
      dataclasses.replace(stage.data, num_workers=0), sources=sources, tokenizer=tokenizer,
      tokens_per_tile=model_cfg.tokens_per_tile, tile_size=stage.image_size, batch_size=rows, seed=exp.seed,
      read_threads=0))
  stage, schedule = epochs_lib.resolve(
      stage, sources=sources, probe=probe, log=log,
      saved=ckpt_lib.read_meta(checkpointer.directory) if start and stage.epochs else None)
  exp = dataclasses.replace(exp, stages=[*exp.stages[:index], stage, *exp.stages[index + 1:]])
  if start:  # resume: restore straight into the shards, nothing initialised
    built = stage_lib.build_stage(exp, index, mesh, vocab_size=tokenizer.vocab_size,
                                  image_token_id=tokenizer.image_id, init="abstract", num_sources=len(source_names))
    start, state, _ = checkpointer.restore_latest(built.state, data_iter, log)  # a damaged step falls back
    if start:
      log(f"[{stage.name}] resumed from step {start}")
  if not start:
    built = stage_lib.build_stage(exp, index, mesh, vocab_size=tokenizer.vocab_size,
                                  image_token_id=tokenizer.image_id, num_sources=len(source_names),
                                  init=lambda cfg: initial_params(exp, index, workdir, cfg, mesh, log))
    state = built.state
  meta = {"model": config_lib.to_dict(model_cfg), "stage": config_lib.to_dict(stage), "experiment": exp.name,
          **({"schedule": schedule} if schedule else {})}

  step_flops = flops_lib.train_step_flops(model_cfg, **flops_lib.stage_shapes(stage))
  peak_tflops = flops_lib.peak_tflops_per_device(jax.devices()[0].device_kind)
  log(f"[{stage.name}] {step_flops / 1e12:.4g} TFLOPs per step (analytic, forward + backward); peak per device "
      f"{f'{peak_tflops:g} TFLOP/s' if peak_tflops else 'unknown (set MM15_PEAK_TFLOPS for MFU)'}")

  writer = MetricsWriter(out_dir, resume_step=start, wandb_run=wandb_log.open_run(exp, stage, out_dir))
  progress = Progress(stage.name, stage.steps, start)
  window, losses, nonfinite_run = [], [], 0
  t_start = time.perf_counter()
  step = start
  trace = profile_lib.StepTrace(config_lib.profile_steps(exp.profile), layout.profile_dir(workdir, stage),
                                lambda line: log(f"[{stage.name}] {line}"))
  try:
    with distributed.Preemption() as preemption, sharding.use_mesh(mesh), trace:
      stop = preemption.stop_after(step)
      while step < stage.steps and not stop:
        checkpointer.check()  # a failed asynchronous save stops the run here
        batch = next(data_iter)
        host = {"tokens_nonpad": int((batch.segment_ids > 0).sum()), "tokens_total": batch.segment_ids.size,
                "stats": {k: int(np.sum(v)) for k, v in batch.stats.items()}}
        trace.before(step + 1)
        state, metrics = built.step(state, sharding.global_batch(batch.without_stats(), mesh))
        step += 1
        trace.after(step, metrics)
        window.append((metrics, host))
        stop = preemption.stop_after(step)
        if step % stage.log_every == 0 or step in (start + 1, stage.steps) or stop:
          window = jax.device_get(window)
          for m, _ in window:  # K non-finite steps in a row stop the run
            nonfinite_run = nonfinite_run + 1 if m["nonfinite"] else 0
            if nonfinite_run >= stage.max_nonfinite_steps:
              raise NonFiniteError(
                  f"[{stage.name}] {nonfinite_run} non-finite steps in a row before step {step}; the last good "
                  f"checkpoint in {checkpointer.directory} is kept (config key "
                  f"stages.{stage.name}.max_nonfinite_steps)")
          scalars = _summarise(window, source_names)
          window = []
          losses.append((step, scalars["loss"]))
          scalars["lr"] = float(optim.schedule(stage)(max(int(state.step) - 1, 0)))
          rate = progress.rate(step)
          scalars["steps_per_s"] = rate
          scalars["tokens_per_s"] = rate * scalars.pop("tokens_nonpad_mean") * jax.process_count()
          scalars.update(flops_lib.utilisation(step_flops, rate, jax.device_count(), peak_tflops))
          writer.write(step, scalars)
          progress.report(step, rate, {k: scalars[k] for k in ("loss", "grad_norm", "lr", "packing")})
        if stage.eval_every and (step % stage.eval_every == 0 or step == stage.steps):
          model = nnx.merge(built.graphdef, state.params, built.rest)
          writer.write(step, evaluate(model, tokenizer, stage, model_cfg, log))
        stop = stop or preemption.stop_after(step)  # one process: a SIGTERM during logging or eval counts now
        if step % stage.checkpoint_every == 0 or step == stage.steps or stop:
          checkpointer.save(step, state, data_iter, {**meta, "step": step})
      if stop:
        log(f"[{stage.name}] SIGTERM: saved step {step}, exiting")
        raise SystemExit(143)
  finally:
    checkpointer.close()  # waits for the asynchronous save in flight
    writer.close()
  summary = {"name": stage.name, "steps": stage.steps, "loss_first": losses[0][1] if losses else float("nan"),
             "loss_last": losses[-1][1] if losses else float("nan"), "seconds": time.perf_counter() - t_start,
             "checkpoint": checkpointer.directory}
  paths.path(out_dir).joinpath("summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def _summarise(window, source_names) -> dict[str, float]:
  """Means over a logging window; per-source loss from token-weighted sums."""
  ms = [m for m, _ in window]
  hosts = [h for _, h in window]
  out = {"steps": len(ms)}
  for k in ms[0]:
    if k.startswith("source_"):
      continue
    out[k] = float(np.mean([m[k] for m in ms]))
  out["nonfinite"] = float(np.sum([m["nonfinite"] for m in ms]))
  ce_sum = np.sum([m["source_ce_sum"] for m in ms], axis=0)
  n_tok = np.sum([m["source_tokens"] for m in ms], axis=0)
  for name, c, n in zip(source_names, ce_sum, n_tok):
    if n > 0:
      out[f"loss/{name}"] = float(c / n)
  out["tokens_nonpad_mean"] = float(np.mean([h["tokens_nonpad"] for h in hosts]))
  out["packing"] = float(np.sum([h["tokens_nonpad"] for h in hosts]) / np.sum([h["tokens_total"] for h in hosts]))
  for k in hosts[0]["stats"]:
    out[k] = float(np.sum([h["stats"][k] for h in hosts]))
  return out
