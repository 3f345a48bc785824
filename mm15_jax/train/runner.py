"""Runs one stage of an experiment: the same loop for pretraining, OCR continual pretraining and SFT.

A stage restarts from its own newest complete checkpoint without being told (preemption), else initialises from
`init_from`: "" (random), "previous" (the stage before, position embeddings resized to this stage's image size) or a
checkpoint directory (e.g. imported Hugging Face weights).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from flax import nnx

from mm15_jax import config as config_lib
from mm15_jax import sharding
from mm15_jax.config import Experiment, ModelConfig, StageConfig
from mm15_jax.data import pipeline as pipeline_lib
from mm15_jax.data import records
from mm15_jax.data.tokenizer import Tokenizer
from mm15_jax.models import vit
from mm15_jax.train import checkpoint as ckpt_lib
from mm15_jax.train import distributed
from mm15_jax.train import flops as flops_lib
from mm15_jax.train import lock
from mm15_jax.train import optim
from mm15_jax.train import state as state_lib
from mm15_jax.train.metrics import MetricsWriter, Progress
from mm15_jax.train.step import TrainState, make_train_step


class NonFiniteError(RuntimeError):
  pass


def stage_model_config(model: ModelConfig, stage: StageConfig, vocab_size: int) -> ModelConfig:
  """The model as this stage sees it: encoder position embeddings at the stage's tile size, vocab of the tokenizer."""
  if model.decoder.vocab_size and model.decoder.vocab_size < vocab_size:
    raise ValueError(f"config key model.decoder.vocab_size={model.decoder.vocab_size} is smaller than the "
                     f"tokenizer's {vocab_size} (0 takes the tokenizer's)")
  return dataclasses.replace(
      model, vision=dataclasses.replace(model.vision, image_size=stage.image_size),
      decoder=dataclasses.replace(model.decoder, vocab_size=model.decoder.vocab_size or vocab_size))


def stage_dir(workdir: str, stage: StageConfig) -> str:
  return os.path.join(workdir, stage.name)


def checkpoint_dir(workdir: str, stage: StageConfig) -> str:
  return os.path.join(stage_dir(workdir, stage), "checkpoints")


def initial_params(exp: Experiment, index: int, workdir: str, model_cfg: ModelConfig, mesh, log):
  """(graphdef, params, rest) for the start of stage `index`."""
  stage = exp.stages[index]
  source = stage.init_from
  if source == "previous":
    if index == 0:
      raise ValueError(f"config key stages.{stage.name}.init_from='previous' but it is the first stage")
    source = checkpoint_dir(workdir, exp.stages[index - 1])
  if not source:
    log(f"[{stage.name}] random initialisation (seed {exp.seed})")
    return state_lib.init_params(model_cfg, mesh, exp.seed)
  saved_cfg, graphdef, like, rest = state_lib.restore_model_params(source, mesh, exp.seed)
  log(f"[{stage.name}] initialising from {source} (encoder at {saved_cfg.vision.image_size}px)")
  if saved_cfg.vision.image_size != model_cfg.vision.image_size:
    model = nnx.merge(graphdef, like, rest)
    vit.resize_image_size(model, model_cfg.vision.image_size)  # e.g. position embeddings 378 -> 672
    like = nnx.state(model, nnx.Param)
  # Rebuild under this stage's config so the graph is exactly that of a fresh model of this stage.
  graphdef, params, _ = state_lib.abstract_model(model_cfg, exp.seed)
  state_lib.check_shapes(params, like, f"config key stages.{stage.name}.init_from={source!r}")
  shardings = state_lib.param_shardings(params, mesh)
  nnx.replace_by_pure_dict(params, nnx.to_pure_dict(like))
  params = jax.device_put(params, shardings)
  return graphdef, params, rest


@lock.holds_workdir
def run_stage(exp: Experiment, index: int, workdir: str, *, log=print, data_hosts: int | None = None) -> dict:
  """Trains stage `index` of `exp` in `workdir/<stage name>`; returns the summary (also in summary.json).

  `data_hosts`: how many per-host data shards make up the global batch (default: the process count). Only a single
  process may set it, to read the shards of `data_hosts` hosts itself: it then sees the very batches that a run of
  that many processes sees (a multi-host run reproduced on one process).
  """
  stage = exp.stages[index]
  out_dir = stage_dir(workdir, stage)
  os.makedirs(out_dir, exist_ok=True)
  tokenizer = Tokenizer(stage.data.tokenizer)
  model_cfg = stage_model_config(exp.model, stage, tokenizer.vocab_size)
  mesh = sharding.make_mesh(exp.mesh)
  log(f"[{stage.name}] mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices, "
      f"{jax.process_count()} process(es)")

  # Data: each host reads its own share.
  sources = pipeline_lib.open_sources(stage.data, split="train")
  source_names = sorted(sources)
  if stage.batch_size % (jax.process_count() * stage.grad_accum):
    raise ValueError(f"config key stages.{stage.name}.batch_size={stage.batch_size} must divide by process count "
                     f"x grad_accum = {jax.process_count() * stage.grad_accum}")
  host_pipeline = lambda process_index, process_count: pipeline_lib.make_pipeline(
      stage.data, sources=sources, tokenizer=tokenizer, tokens_per_tile=model_cfg.connector.pooled_side ** 2,
      tile_size=stage.image_size, batch_size=stage.batch_size // process_count, process_index=process_index,
      process_count=process_count, seed=exp.seed)
  if data_hosts is None or data_hosts == jax.process_count():
    data_iter = host_pipeline(jax.process_index(), jax.process_count())
  else:
    if jax.process_count() != 1 or data_hosts < 1 or stage.batch_size % (data_hosts * stage.grad_accum):
      raise ValueError(f"data_hosts={data_hosts} needs a single process and stages.{stage.name}.batch_size="
                       f"{stage.batch_size} divisible by data_hosts x grad_accum")
    data_iter = pipeline_lib.ConcatenatedHosts(host_pipeline(p, data_hosts) for p in range(data_hosts))

  checkpointer = ckpt_lib.Checkpointer(checkpoint_dir(workdir, stage), keep=stage.keep_checkpoints,
                                       keep_period=stage.keep_every or None)
  start = checkpointer.latest_step() or 0
  if start:  # resume: restore straight into the shards, nothing initialised
    graphdef, params, rest = state_lib.sharded_abstract_model(model_cfg, mesh, exp.seed)
    tx = optim.make_optimizer(stage, params)
    start, state, _ = checkpointer.restore_latest(state_lib.abstract_train_state(params, tx, mesh), data_iter, log)
    if start:
      log(f"[{stage.name}] resumed from step {start}")
  if not start:
    graphdef, params, rest = initial_params(exp, index, workdir, model_cfg, mesh, log)
    tx = optim.make_optimizer(stage, params)
    state = state_lib.new_train_state(params, tx, mesh)
  meta = {"model": config_lib.to_dict(model_cfg), "stage": config_lib.to_dict(stage), "experiment": exp.name}

  step_fn = make_train_step(graphdef, rest, tx, model_cfg=model_cfg, image_token_id=tokenizer.image_id,
                            num_sources=len(source_names), grad_accum=stage.grad_accum)
  shardings = state_lib.state_shardings(state)
  jit_step = jax.jit(step_fn, in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)

  step_flops = flops_lib.train_step_flops(model_cfg, batch_size=stage.batch_size, seq_len=stage.data.seq_len,
                                          max_images=stage.data.max_images, tile_size=stage.image_size)
  peak_tflops = flops_lib.peak_tflops_per_device(jax.devices()[0].device_kind)
  log(f"[{stage.name}] {step_flops / 1e12:.4g} TFLOPs per step (analytic, forward + backward); peak per device "
      f"{f'{peak_tflops:g} TFLOP/s' if peak_tflops else 'unknown (set MM15_PEAK_TFLOPS for MFU)'}")

  writer = MetricsWriter(out_dir, resume_step=start)
  progress = Progress(stage.name, stage.steps, start)
  window, losses, nonfinite_run = [], [], 0
  t_start = time.perf_counter()
  step = start
  try:
    with distributed.Preemption() as preemption, sharding.use_mesh(mesh):
      stop = preemption.stop_after(step)
      while step < stage.steps and not stop:
        checkpointer.check()  # a failed asynchronous save stops the run here
        batch = next(data_iter)
        stats = {k: int(np.sum(batch.pop(k))) for k in list(batch) if k.startswith("stat_")}
        host = {"tokens_nonpad": int((batch["segment_ids"] > 0).sum()), "tokens_total": batch["segment_ids"].size,
                **stats}
        state, metrics = jit_step(state, state_lib.global_batch(batch, mesh))
        step += 1
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
          writer.write(step, periodic_eval(nnx.merge(graphdef, state.params, rest), tokenizer, stage, model_cfg,
                                           log))
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
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def periodic_eval(model, tokenizer, stage: StageConfig, model_cfg: ModelConfig, log) -> dict[str, float]:
  """A quick held-out evaluation inside the training loop -> scalars "eval/<benchmark>", "eval/<category>"."""
  from mm15_jax.eval import benchmarks, run as eval_run
  result = eval_run.evaluate_params(
      model, tokenizer, stage.data, tile_size=stage.image_size, tokens_per_tile=model_cfg.connector.pooled_side ** 2,
      benchmarks=benchmarks.select(stage.data.data_dir, stage.eval_benchmarks or None),
      max_examples=stage.eval_max_examples, log=log)
  scalars = {f"eval/{n}": b["score"] for n, b in result["benchmarks"].items()}
  scalars.update({f"eval/{c}": v["score"] for c, v in result["categories"].items()})
  return scalars


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
  for k in hosts[0]:
    if k.startswith("stat_"):
      out[k[5:]] = float(np.sum([h[k] for h in hosts]))
  return out
