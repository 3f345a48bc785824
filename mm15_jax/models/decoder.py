"""Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU or MoE FFN, tied/untied embeddings.

Layers are grouped in units of `moe.every` layers whose last layer has the MoE FFN (one dense layer when there is
no MoE); the units' parameters are stacked on a "layers" axis and run under jax.lax.scan (or an unrolled loop with
identical numerics when model.scan_layers is False).

Attention mask for packed rows: a token attends to earlier-or-same positions of its own segment (segment_ids equal);
padding (segment 0) attends only to padding, so every row of the softmax is finite.

Causal attention runs the kernel `model.attention` selects (mm15_jax.kernels.attention: blocked on CPU, splash
on TPU, cuDNN on GPU by default); decode steps attend densely to the cache.

KV cache (generation): {"k", "v": [units, every, B, S, kv_heads, head_dim], "valid": [B, S] bool,
"index": [B] int32 next write slot}. `prefill` fills it from a right-padded prompt, `decode` appends one token.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mm15_jax.config import DecoderConfig, RopeScaling
from mm15_jax.kernels import attention as attention_lib
from mm15_jax.kernels.attention import CAUSAL_BLOCK, attend, segment_causal_mask  # noqa: F401 (the decoder's API)
from mm15_jax.models import layers
from mm15_jax.models.moe import MoEFeedForward
from mm15_jax.sharding import constrain

ACT = ("batch", "length", "embed")
AUX_KEYS = ("moe_load_balance_loss", "moe_z_loss", "moe_drop_rate")


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None, positions_BT=None):
  """RoPE's inverse frequencies [head_dim // 2], as transformers computes them for each rope_type."""
  exponents = jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim
  if scaling is None:
    return 1.0 / theta ** exponents
  if scaling.kind == "dynamic":  # NTK-aware theta for the longest position of this call (as HF's dynamic update)
    seq_len = jnp.maximum(jnp.max(positions_BT).astype(jnp.float32) + 1.0, scaling.original_max_len)
    grown = scaling.factor * seq_len / scaling.original_max_len - (scaling.factor - 1.0)
    return 1.0 / (theta * grown ** (head_dim / (head_dim - 2))) ** exponents
  inv_freq = 1.0 / theta ** exponents
  if scaling.kind == "linear":
    return inv_freq / scaling.factor
  if scaling.kind != "llama3":
    raise ValueError(f"config key model.decoder.rope_scaling.kind {scaling.kind!r} is not one of linear, dynamic, "
                     f"llama3")
  wavelen = 2 * math.pi / inv_freq
  low_freq_wavelen = scaling.original_max_len / scaling.low_freq_factor
  high_freq_wavelen = scaling.original_max_len / scaling.high_freq_factor
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = ((scaling.original_max_len / wavelen - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(medium, smoothed, scaled)


def rope(x_BTHK, positions_BT, theta: float, scaling: RopeScaling | None = None):
  """Rotary embedding, HF Llama layout (rotate_half over the two halves of head_dim)."""
  half = x_BTHK.shape[-1] // 2
  inv_freq = rope_inv_freq(x_BTHK.shape[-1], theta, scaling, positions_BT)
  freqs_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs_BTF, freqs_BTF], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x_BTHK.dtype), jnp.sin(emb).astype(x_BTHK.dtype)
  rotated = jnp.concatenate([-x_BTHK[..., half:], x_BTHK[..., :half]], axis=-1)
  return x_BTHK * cos + rotated * sin


def head_logits(x_BTD, w_DV):
  """Final-normed hidden states -> logits [B, T, V] float32."""
  out = layers.project(x_BTD, w_DV, preferred_element_type=jnp.float32)
  return constrain(out.astype(jnp.float32), ("batch", "length", "vocab"))


class Attention(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, attention: str = "auto", rngs: nnx.Rngs):
    d, h, g = cfg.d_model, cfg.num_heads, cfg.num_kv_heads
    hd = cfg.head_dim or d // h
    if h % g:
      raise ValueError(f"model.decoder.num_heads {h} is not a multiple of num_kv_heads {g}")
    mk = lambda shape, names, init=layers.fan_in_init(d): layers.param(rngs, init, shape, names, param_dtype)
    self.q = mk((d, h, hd), ("embed", "heads", "head_dim"))
    self.k = mk((d, g, hd), ("embed", "kv_heads", "head_dim"))
    self.v = mk((d, g, hd), ("embed", "kv_heads", "head_dim"))
    self.o = mk((h, hd, d), ("heads", "head_dim", "embed"), layers.fan_in_init(h * hd))
    self.use_bias = cfg.qkv_bias
    if cfg.qkv_bias:
      self.q_bias = mk((h, hd), ("heads", "head_dim"), layers.zeros_init)
      self.k_bias = mk((g, hd), ("kv_heads", "head_dim"), layers.zeros_init)
      self.v_bias = mk((g, hd), ("kv_heads", "head_dim"), layers.zeros_init)
    self.theta = cfg.rope_theta
    # A tuple, not the config object: the graphdef (a static jit argument) must stay hashable.
    self.rope_scaling = None if cfg.rope_scaling is None else dataclasses.astuple(cfg.rope_scaling)
    self.dtype, self.attention = dtype, attention

  def qkv(self, x_BTD, positions_BT):
    dt = self.dtype
    proj = lambda w: layers.project(x_BTD, w[...].astype(dt))  # [B, T, heads, head_dim]
    q, k, v = proj(self.q), proj(self.k), proj(self.v)
    if self.use_bias:
      q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
    scaling = None if self.rope_scaling is None else RopeScaling(*self.rope_scaling)
    q = constrain(rope(q, positions_BT, self.theta, scaling), ("batch", "length", "heads", "head_dim"))
    k = constrain(rope(k, positions_BT, self.theta, scaling), ("batch", "length", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    return q, k, v

  def out(self, o_BTHK):
    return layers.project(o_BTHK, self.o[...].astype(self.dtype), n_contract=2)

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, mask_BTS=None):
    """Causal self-attention of packed rows; also returns (k, v) for a cache. mask_BTS: segment_causal_mask of
    segment_ids_BT (built once for all layers; None for kernels that take the ids)."""
    q, k, v = self.qkv(x_BTD, positions_BT)
    out = attention_lib.causal_attention(q, k, v, segment_ids_BT, self.dtype, impl=self.attention, mask_BTS=mask_BTS)
    return self.out(out), (k, v)

  def decode(self, x_B1D, positions_B1, cache_kv, valid_BS, index_B):
    """One new token per row: writes its k/v at slot index_B, attends to the valid slots."""
    q, k, v = self.qkv(x_B1D, positions_B1)
    write = jax.vmap(lambda c, new, i: jax.lax.dynamic_update_slice_in_dim(c, new, i, axis=0))
    ck, cv = write(cache_kv[0], k.astype(cache_kv[0].dtype), index_B), write(cache_kv[1], v.astype(cache_kv[1].dtype),
                                                                             index_B)
    return self.out(attend(q, ck, cv, valid_BS[:, None, :], self.dtype)), (ck, cv)


class DecoderBlock(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, use_moe: bool, dtype, param_dtype, attention: str = "auto",
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn_norm = layers.RMSNorm(cfg.d_model, eps=cfg.rms_eps, **kw)
    self.attn = Attention(cfg, attention=attention, **kw)
    self.ffn_norm = layers.RMSNorm(cfg.d_model, eps=cfg.rms_eps, **kw)
    self.use_moe = use_moe
    if use_moe:
      self.ffn = MoEFeedForward(cfg.d_model, cfg.ffn_dim, cfg.moe, **kw)
    else:
      self.ffn = layers.SwiGLU(cfg.d_model, cfg.ffn_dim, **kw)

  def _ffn(self, x_BTD, token_mask_BT):
    h = self.ffn_norm(x_BTD)
    if self.use_moe:
      y, aux = self.ffn(h, token_mask_BT)
    else:
      y, aux = self.ffn(h), {k: jnp.zeros((), jnp.float32) for k in AUX_KEYS}
    return constrain(x_BTD + y, ACT), aux

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, mask_BTS):
    """mask_BTS: segment_causal_mask(segment_ids_BT) as the decoder builds it, or None (see Attention)."""
    a, kv = self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT, mask_BTS)
    x_BTD = constrain(x_BTD + a, ACT)
    x_BTD, aux = self._ffn(x_BTD, segment_ids_BT != 0)
    return x_BTD, aux, kv

  def decode(self, x_B1D, positions_B1, cache_kv, valid_BS, index_B):
    a, kv = self.attn.decode(self.attn_norm(x_B1D), positions_B1, cache_kv, valid_BS, index_B)
    x_B1D, aux = self._ffn(x_B1D + a, None)
    return x_B1D, aux, kv


class DecoderUnit(nnx.Module):
  """`every` consecutive layers; the last one has the MoE FFN when the config has MoE."""

  def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, attention: str = "auto", rngs: nnx.Rngs):
    n = cfg.moe.every if cfg.moe is not None else 1
    self.blocks = nnx.List([
        DecoderBlock(cfg, use_moe=cfg.moe is not None and i == n - 1, dtype=dtype, param_dtype=param_dtype,
                     attention=attention, rngs=rngs) for i in range(n)])

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, mask_BTS):
    kvs, auxes = [], []
    for block in self.blocks:
      x_BTD, aux, kv = block(x_BTD, positions_BT, segment_ids_BT, mask_BTS)
      kvs.append(kv)
      auxes.append(aux)
    return x_BTD, _sum_aux(auxes), _stack_kv(kvs)

  def decode(self, x_B1D, positions_B1, cache_kv, valid_BS, index_B):
    kvs, auxes = [], []
    for i, block in enumerate(self.blocks):
      x_B1D, aux, kv = block.decode(x_B1D, positions_B1, (cache_kv[0][i], cache_kv[1][i]), valid_BS, index_B)
      kvs.append(kv)
      auxes.append(aux)
    return x_B1D, _sum_aux(auxes), _stack_kv(kvs)


def _sum_aux(auxes):
  return {k: sum(a[k] for a in auxes) for k in AUX_KEYS}


def _stack_kv(kvs):
  return jnp.stack([kv[0] for kv in kvs]), jnp.stack([kv[1] for kv in kvs])


class Decoder(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, dtype="bfloat16", param_dtype="float32", remat: str = "none",
               scan_layers: bool = True, attention: str = "auto", rngs: nnx.Rngs):
    every = cfg.moe.every if cfg.moe is not None else 1
    if cfg.num_layers % every:
      raise ValueError(f"model.decoder.num_layers {cfg.num_layers} is not a multiple of moe.every {every}")
    self.every, self.has_moe = every, cfg.moe is not None
    self.num_kv_heads, self.head_dim = cfg.num_kv_heads, cfg.head_dim or cfg.d_model // cfg.num_heads
    self.dtype, pdt = layers.dtype_of(dtype), layers.dtype_of(param_dtype)
    self.remat, self.scan_layers = remat, scan_layers
    self.attention = attention_lib.check_impl(attention)
    self.num_units = cfg.num_layers // every
    self.embedding = layers.param(rngs, layers.normal_init(0.02), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                                  pdt)
    self.units = layers.stacked(self.num_units,
                                lambda r: DecoderUnit(cfg, dtype=self.dtype, param_dtype=pdt, attention=attention,
                                                      rngs=r), rngs)
    self.final_norm = layers.RMSNorm(cfg.d_model, eps=cfg.rms_eps, dtype=self.dtype, param_dtype=pdt, rngs=rngs)
    self.lm_head = None if cfg.tie_embeddings else layers.param(
        rngs, layers.fan_in_init(cfg.d_model), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pdt)

  def embed(self, tokens_BT):
    x = jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)
    return constrain(x, ACT)

  def logits(self, x_BTD):
    """The last hidden states -> logits [B, T, V] float32."""
    return head_logits(self.final_norm(x_BTD), self.head_weight())

  def head_weight(self):
    """The LM head [D, V] in the compute dtype (the embedding's transpose when tied)."""
    if self.lm_head is None:
      return self.embedding[...].astype(self.dtype).T
    return self.lm_head[...].astype(self.dtype)

  def _mean_aux(self, aux_U):
    moe_layers = self.num_units if self.has_moe else 1
    return {k: v.sum() / moe_layers for k, v in aux_U.items()}

  def __call__(self, x_BTD, segment_ids_BT, positions_BT, *, return_kv: bool = False):
    """x: input embeddings [B, T, D] -> (logits [B, T, V] float32, aux, kv [U, every, B, T, G, K] x2 or None)."""
    x_BTD, aux, kv = self.hidden(x_BTD, segment_ids_BT, positions_BT, return_kv=return_kv)
    return self.logits(x_BTD), aux, kv

  def hidden(self, x_BTD, segment_ids_BT, positions_BT, *, return_kv: bool = False):
    """The last layer's output [B, T, D] (`logits` takes it from there), aux, kv."""
    needs_mask = attention_lib.resolve(self.attention) != "splash"
    mask_BTS = segment_causal_mask(segment_ids_BT) if needs_mask else None

    def body(unit, x, _):
      x, aux, kv = unit(x, positions_BT, segment_ids_BT, mask_BTS)
      return x, (aux, kv if return_kv else None)

    x_BTD, (aux_U, kv) = layers.run_stack(self.units, body, x_BTD, length=self.num_units, scan=self.scan_layers,
                                          remat=self.remat)
    return x_BTD, self._mean_aux(aux_U), kv

  def init_cache(self, batch: int, max_len: int):
    shape = (self.num_units, self.every, batch, max_len, self.num_kv_heads, self.head_dim)
    return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype),
            "valid": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((batch,), jnp.int32)}

  def prefill(self, x_BTD, segment_ids_BT, positions_BT, *, max_len: int):
    """Right-padded prompt (segment 1 on real tokens, 0 on padding) -> (logits, aux, cache of length max_len)."""
    b, t, _ = x_BTD.shape
    if t > max_len:
      raise ValueError(f"prompt length {t} exceeds the cache length {max_len}")
    logits, aux, (k, v) = self(x_BTD, segment_ids_BT, positions_BT, return_kv=True)
    cache = self.init_cache(b, max_len)
    cache["k"] = cache["k"].at[:, :, :, :t].set(k.astype(self.dtype))
    cache["v"] = cache["v"].at[:, :, :, :t].set(v.astype(self.dtype))
    cache["valid"] = cache["valid"].at[:, :t].set(segment_ids_BT != 0)
    cache["index"] = (segment_ids_BT != 0).sum(-1).astype(jnp.int32)
    return logits, aux, cache

  def decode(self, x_B1D, positions_B1, cache):
    """One token per row at slot cache["index"] -> (logits [B, 1, V], aux, updated cache)."""
    index_B = cache["index"]
    valid_BS = cache["valid"] | (jnp.arange(cache["valid"].shape[1])[None] == index_B[:, None])

    def body(unit, x, kv):
      x, aux, kv = unit.decode(x, positions_B1, kv, valid_BS, index_B)
      return x, (aux, kv)

    x_B1D, (aux_U, (k, v)) = layers.run_stack(self.units, body, x_B1D, (cache["k"], cache["v"]),
                                              length=self.num_units, scan=self.scan_layers, remat="none")
    new_cache = {"k": k, "v": v, "valid": valid_BS, "index": index_B + 1}
    return self.logits(x_B1D), self._mean_aux(aux_U), new_cache


def upcycle_from_dense(dense: Decoder, moe: Decoder) -> None:
  """Sparse upcycling: fills `moe` from a dense decoder of the same shape.

  Every parameter is copied from the same layer of `dense`; each MoE FFN's experts all start as copies of that
  layer's dense FFN, and its router keeps the fresh initialisation it has in `moe`.
  """
  if dense.has_moe or not moe.has_moe:
    raise ValueError("upcycle_from_dense needs a dense source decoder and an MoE target decoder")
  src = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(dense, nnx.Param))}
  state = nnx.state(moe, nnx.Param)
  every = moe.every
  for path, var in nnx.to_flat_state(state):
    if path[0] != "units":
      value = src[path]
    else:
      j, rest = path[2], path[3:]
      if rest == ("ffn", "router"):
        continue
      layers_UX = src[("units", "blocks", 0) + rest][j::every]  # dense layer l = u * every + j
      if rest[0] == "ffn" and moe.units.blocks[j].use_moe:
        layers_UX = jnp.broadcast_to(layers_UX[:, None], var.shape)  # [U, E, ...]: every expert a copy
      value = layers_UX
    if value.shape != var.shape:
      raise ValueError(f"upcycle: {'/'.join(map(str, path))} has shape {var.shape}, dense source {value.shape}")
    var.set_value(value)
  nnx.update(moe, state)
