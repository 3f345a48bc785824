"""The training loss of the LM head: weighted next-token cross-entropy, fused with its gradient.

`weighted_cross_entropy` computes the head's gradients in the forward pass, `chunk` positions at a time, so the
[B, T, V] float32 logits (and their softmax) are never held for the backward pass: a chunk's logits live only while
it is computed. Each row's weighted tokens move to its front first (keeping their order); chunks past the longest
row's count hold no loss and are skipped (lax.cond), head and gradient alike. Image placeholders, SFT prompts and
padding carry no loss: 28% of the positions in bench/train_step.py's batch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def cross_entropy(logits_BTV, targets_BT):
  """Per-token cross-entropy in float32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return logz_BT - target_logit_BT


def weighted_cross_entropy(x_BTD, w_DV, targets_BT, weights_BT, *, head, chunk: int = 0):
  """(sum of weights * CE, per-token CE [B, T] float32, 0 where the weight is 0) of the logits `head(x, w)`.

  Differentiable in x and w through the first output only: the per-token CE is for metrics (no gradient). head: the
  model's (x_BCD, w_DV) -> logits [B, C, V] (MultimodalModel.head_logits). chunk: positions per head application
  (0: the whole length, one chunk)."""
  loss, ce_BT = _weighted_cross_entropy(x_BTD, w_DV, targets_BT, weights_BT.astype(jnp.float32), head, chunk,
                                        w_DV.dtype)
  return loss, jax.lax.stop_gradient(ce_BT)


def _loss_and_grads(x_BTD, w_DV, targets_BT, weights_BT, head, chunk: int):
  """-> (loss, ce_BT, d loss / dx, d loss / dw), chunk by chunk over each row's weighted tokens first."""
  t = x_BTD.shape[1]
  chunk = min(chunk or t, t)
  order_BT = jnp.argsort(weights_BT == 0, axis=1, stable=True)
  x_BTD = jnp.take_along_axis(x_BTD, order_BT[..., None], axis=1)
  targets_BT, weights_BT = (jnp.take_along_axis(a, order_BT, axis=1) for a in (targets_BT, weights_BT))

  def chunk_grads(dw_DV, x_BCD, targets_BC, weights_BC):
    ce_BC, vjp = jax.vjp(lambda x, w: cross_entropy(head(x, w), targets_BC), x_BCD, w_DV)
    dx_BCD, dw = vjp(weights_BC)
    return dw_DV + dw.astype(jnp.float32), ce_BC, dx_BCD

  def skip(dw_DV, x_BCD, targets_BC, weights_BC):
    return dw_DV, jnp.zeros(targets_BC.shape, jnp.float32), jnp.zeros_like(x_BCD)

  dw_DV = jnp.zeros(w_DV.shape, jnp.float32)
  ce_chunks, dx_chunks = [], []
  for lo in range(0, t, chunk):
    part = slice(lo, min(lo + chunk, t))
    args = (dw_DV, x_BTD[:, part], targets_BT[:, part], weights_BT[:, part])
    dw_DV, ce_BC, dx_BCD = jax.lax.cond((args[3] != 0).any(), chunk_grads, skip, *args)
    ce_chunks.append(ce_BC)
    dx_chunks.append(dx_BCD)
  ce_BT = jnp.where(weights_BT != 0, jnp.concatenate(ce_chunks, axis=1), 0.0)
  loss = (ce_BT * weights_BT).sum()
  inverse_BT = jnp.argsort(order_BT, axis=1)  # back to the tokens' order
  dx_BTD = jnp.take_along_axis(jnp.concatenate(dx_chunks, axis=1), inverse_BT[..., None], axis=1)
  return loss, jnp.take_along_axis(ce_BT, inverse_BT, axis=1), dx_BTD, dw_DV


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _weighted_cross_entropy(x_BTD, w_DV, targets_BT, weights_BT, head, chunk, w_dtype):
  del w_dtype
  return _loss_and_grads(x_BTD, w_DV, targets_BT, weights_BT, head, chunk)[:2]


def _weighted_cross_entropy_fwd(x_BTD, w_DV, targets_BT, weights_BT, head, chunk, w_dtype):
  loss, ce_BT, dx_BTD, dw_DV = _loss_and_grads(x_BTD, w_DV, targets_BT, weights_BT, head, chunk)
  return (loss, ce_BT), (dx_BTD, dw_DV)


def _weighted_cross_entropy_bwd(head, chunk, w_dtype, residuals, cotangents):
  del head, chunk
  dx_BTD, dw_DV = residuals
  d_loss = cotangents[0]  # the per-token CE's cotangent is zero: weighted_cross_entropy stops its gradient
  return (d_loss * dx_BTD).astype(dx_BTD.dtype), (d_loss * dw_DV).astype(w_dtype), None, None


_weighted_cross_entropy.defvjp(_weighted_cross_entropy_fwd, _weighted_cross_entropy_bwd)
