"""The one train step used by every stage: masked next-token loss + MoE auxiliary losses, AdaFactor update.

A step whose loss or gradients are not finite leaves the state unchanged and reports `nonfinite = 1`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mm15_jax.config import ModelConfig
from mm15_jax.data.batch import Batch
from mm15_jax.train import loss as loss_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: optimiser steps taken in this stage
  params: Any            # nnx.State of the model's Params
  opt_state: Any


def loss_and_metrics(model, batch: Batch, *, model_cfg: ModelConfig, image_token_id: int, num_sources: int):
  x_BTD, w_DV, aux = model.head_inputs(batch, image_token_id=image_token_id)
  mask_BT = batch.loss_mask.astype(jnp.float32)
  num_tokens = mask_BT.sum()
  ce_sum, ce_BT = loss_lib.weighted_cross_entropy(x_BTD, w_DV, batch.targets, mask_BT, head=model.head_logits,
                                                  chunk=model_cfg.loss_chunk)
  ce = ce_sum / jnp.maximum(num_tokens, 1.0)
  loss = ce
  metrics = {"ce": ce, "loss_tokens": num_tokens}
  moe = model_cfg.decoder.moe
  if moe is not None:
    loss = loss + moe.load_balance_weight * aux["moe_load_balance_loss"] + moe.z_loss_weight * aux["moe_z_loss"]
    metrics.update({k: aux[k] for k in ("moe_load_balance_loss", "moe_z_loss", "moe_drop_rate")})
  # Per-source sums; the host divides, so per-source loss is exact over any window of steps.
  onehot_BTS = jax.nn.one_hot(batch.source_ids, num_sources, dtype=jnp.float32) * mask_BT[..., None]
  metrics["source_ce_sum"] = jnp.einsum("bt,bts->s", ce_BT, onehot_BTS)
  metrics["source_tokens"] = onehot_BTS.sum((0, 1))
  metrics["loss"] = loss
  return loss, metrics


def make_train_step(graphdef, rest, tx: optax.GradientTransformation, *, model_cfg: ModelConfig,
                    image_token_id: int, num_sources: int, grad_accum: int = 1):
  """Returns `step(state, batch) -> (state, metrics)`; train.stage.build_stage jits it with the state's shardings."""

  def grads_of(params, batch):
    def loss_fn(p):
      model = nnx.merge(graphdef, p, rest)
      return loss_and_metrics(model, batch, model_cfg=model_cfg, image_token_id=image_token_id,
                              num_sources=num_sources)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, metrics

  def accumulated_grads(params, batch):
    if grad_accum == 1:
      return grads_of(params, batch)
    # [B, ...] -> [accum, B / accum, ...] taking every accum-th row: each device's contiguous block of rows splits
    # evenly over the micro-batches, so no micro-batch moves between devices. Token-weighted: the accumulated
    # gradient equals one large batch's.
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
                         batch)

    def body(carry, mb):
      grads, metrics = grads_of(params, mb)
      n = metrics["loss_tokens"]
      carry = jax.tree.map(lambda c, g: c + g * n, carry[0], grads), carry[1] + n
      return carry, metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    (gsum, n), ms = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), micro)
    grads = jax.tree.map(lambda g: g / jnp.maximum(n, 1.0), gsum)
    w = ms["loss_tokens"] / jnp.maximum(n, 1.0)
    metrics = {k: (v.sum(0) if k.startswith("source_") or k == "loss_tokens" else jnp.einsum("a,a...->...", w, v))
               for k, v in ms.items()}
    return grads, metrics

  def step(state: TrainState, batch: Batch):
    grads, metrics = accumulated_grads(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=state.step + finite.astype(jnp.int32),
                           params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state))
    metrics.update(grad_norm=grad_norm, nonfinite=1 - finite.astype(jnp.int32))
    return new_state, metrics

  return step
