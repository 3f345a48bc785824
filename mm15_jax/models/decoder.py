"""Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU or MoE FFN, tied/untied embeddings.

Layers are grouped in units of `moe.every` layers whose last layer has the MoE FFN (one dense layer when there is
no MoE); the units' parameters are stacked on a "layers" axis and run under jax.lax.scan (or an unrolled loop with
identical numerics when model.scan_layers is False).

Attention mask for packed rows: a token attends to earlier-or-same positions of its own segment (segment_ids equal);
padding (segment 0) attends only to padding, so every row of the softmax is finite.

Causal attention runs "dense" (scores over the whole [T, T] square, masked) or "blocked" (queries in blocks of
CAUSAL_BLOCK, each against the keys up to the end of its own block: the all-masked blocks above the diagonal are never
computed; head-major layout and a hand-written backward keep XLA:CPU from transposing the scores). Both give the same
values and gradients up to float rounding. "auto" (the default; env MM15_ATTENTION or the `attention_impl` context
select another) picks blocked on CPU, where dense attention cost more than all other matmuls of a layer at T = 1024
(blocked: ~3x faster attention forward + backward, ~1.25x faster train step; bench/train_step.py), and dense
elsewhere. The platform is that of the active mesh's devices (an ahead-of-time compile for TPU on a CPU host gets
dense), else the default backend.

KV cache (generation): {"k", "v": [units, every, B, S, kv_heads, head_dim], "valid": [B, S] bool,
"index": [B] int32 next write slot}. `prefill` fills it from a right-padded prompt, `decode` appends one token.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from mm15_jax.config import DecoderConfig, RopeScaling
from mm15_jax.models import layers
from mm15_jax.models.moe import MoEFeedForward
from mm15_jax.sharding import constrain

ACT = ("batch", "length", "embed")
NEG_INF = float(jnp.finfo(jnp.float32).min)
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


ATTENTION_IMPLS = ("auto", "dense", "blocked")
CAUSAL_BLOCK = 128       # query / key block of the blocked causal attention ...
MAX_CAUSAL_BLOCKS = 16   # ... grown for long rows so that a layer traces at most this many blocks
_attention = {"impl": os.environ.get("MM15_ATTENTION", "auto")}


@contextlib.contextmanager
def attention_impl(impl: str):
  """Causal attention implementation ("auto", "dense", "blocked") for models traced inside this block; a function
  jitted and traced before keeps the implementation it was traced with."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention implementation {impl!r} is not one of {ATTENTION_IMPLS}")
  prev, _attention["impl"] = _attention["impl"], impl
  try:
    yield
  finally:
    _attention["impl"] = prev


def resolve_attention_impl(impl: str | None = None, platform: str | None = None) -> str:
  """The implementation, "dense" or "blocked", that `impl` (default: the selected one) means on `platform` (default:
  the active mesh's)."""
  impl = impl or _attention["impl"]
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention implementation {impl!r} (env MM15_ATTENTION) is not one of {ATTENTION_IMPLS}")
  if impl != "auto":
    return impl
  return "blocked" if (platform or layers.mesh_platform()) == "cpu" else "dense"


def attend(q_BTHK, k_BSGK, v_BSGK, mask_BTS, dtype, *, causal: bool = False, impl: str | None = None,
           block: int = CAUSAL_BLOCK):
  """Grouped-query attention; query head h uses kv head h // (H / G) (HF repeat_kv order). Softmax in float32.

  causal=True promises that mask_BTS hides every key after its query (as segment_causal_mask does): the blocked
  implementation (see the module docstring) may then skip the key blocks above the diagonal.
  """
  t, s = q_BTHK.shape[1], k_BSGK.shape[1]
  block = max(block, -(-t // MAX_CAUSAL_BLOCKS))
  if causal and t == s and t > block and resolve_attention_impl(impl) == "blocked":
    return _attend_causal_blocked(q_BTHK, k_BSGK, v_BSGK, mask_BTS, dtype, block)
  return _attend_dense(q_BTHK, k_BSGK, v_BSGK, mask_BTS, dtype)


def _attend_dense(q_BTHK, k_BSGK, v_BSGK, mask_BTS, dtype):
  b, t, h, hd = q_BTHK.shape
  g = k_BSGK.shape[2]
  q_BTGRK = q_BTHK.reshape(b, t, g, h // g, hd)
  logits = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK, preferred_element_type=jnp.float32) * hd ** -0.5
  logits = jnp.where(mask_BTS[:, None, None], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  out = jnp.einsum("bgrts,bsgk->btgrk", probs, v_BSGK)
  return out.reshape(b, t, h, hd)


def _attend_causal_blocked(q_BTHK, k_BSGK, v_BSGK, mask_BTS, dtype, block: int):
  """Queries [lo, hi) attend to keys [0, hi): the dense computation less the all-masked keys after the block.

  Head-major layout ([B, G, R, T, K], R = H / G) so that every score matmul, forward and backward, is a plain batched
  matmul: the [T, S] scores are never transposed (XLA:CPU copies a transposed operand before its matmul).
  """
  b, t, h, hd = q_BTHK.shape
  g = k_BSGK.shape[2]
  q_BGRTK = q_BTHK.reshape(b, t, g, h // g, hd).transpose(0, 2, 3, 1, 4)
  k_BGSK, v_BGSK = k_BSGK.transpose(0, 2, 1, 3), v_BSGK.transpose(0, 2, 1, 3)
  outs = []
  for lo in range(0, t, block):
    hi = min(lo + block, t)
    outs.append(_block_attention(q_BGRTK[:, :, :, lo:hi], k_BGSK[:, :, :hi], v_BGSK[:, :, :hi],
                                 mask_BTS[:, None, None, lo:hi, :hi], dtype))
  return jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


def _block_forward(q_BGRTK, k_BGSK, v_BGSK, mask_B11TS, dtype):
  """-> (output, unnormalised weights exp(score - row max), their row sums). The weights are 0 where masked (every
  query sees at least its own key) and the output is divided by the sums after the value product: one pass over the
  [T, S] scores fewer than normalising them, and the backward needs no mask."""
  logits = jnp.einsum("bgrtk,bgsk->bgrts", q_BGRTK, k_BGSK, preferred_element_type=jnp.float32)
  logits = jnp.where(mask_B11TS, logits * q_BGRTK.shape[-1] ** -0.5, NEG_INF)
  weights = jnp.exp(logits - logits.max(-1, keepdims=True))
  sums = weights.sum(-1, keepdims=True)
  out = jnp.einsum("bgrts,bgsk->bgrtk", weights.astype(dtype), v_BGSK, preferred_element_type=jnp.float32) / sums
  return out.astype(dtype), weights, sums


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _block_attention(q_BGRTK, k_BGSK, v_BGSK, mask_B11TS, dtype):
  """Attention of one query block (scores in float32, weighted values in `dtype`), with a hand-written backward."""
  return _block_forward(q_BGRTK, k_BGSK, v_BGSK, mask_B11TS, dtype)[0]


def _block_attention_fwd(q_BGRTK, k_BGSK, v_BGSK, mask_B11TS, dtype):
  out, weights, sums = _block_forward(q_BGRTK, k_BGSK, v_BGSK, mask_B11TS, dtype)
  return out, (q_BGRTK, k_BGSK, v_BGSK, weights, sums, out)


def _block_attention_bwd(dt, res, d_out_BGRTK):
  """Softmax backward dS = P * (dP - rowsum(dP * P)) with P = W / sums and rowsum(dP * P) = dO . O, both sides
  divided by the sums through dO / sums (a [T, K] product, not [T, S]). The key-side gradients as [B, G, K, S]
  products transposed afterwards, so the scores enter every matmul untransposed."""
  q, k, v, weights, sums, out = res
  f32 = jnp.float32
  d_out_s = d_out_BGRTK.astype(f32) / sums
  row_s = (d_out_s * out.astype(f32)).sum(-1, keepdims=True)
  d_weights = jnp.einsum("bgrtk,bgsk->bgrts", d_out_s.astype(dt), v, preferred_element_type=f32)
  d_logits = (weights * (d_weights - row_s) * q.shape[-1] ** -0.5).astype(dt)
  dq = jnp.einsum("bgrts,bgsk->bgrtk", d_logits, k, preferred_element_type=f32).astype(q.dtype)
  dk = jnp.einsum("bgrtk,bgrts->bgks", q, d_logits).swapaxes(-1, -2).astype(k.dtype)
  dv = jnp.einsum("bgrtk,bgrts->bgks", d_out_s.astype(dt), weights.astype(dt)).swapaxes(-1, -2).astype(v.dtype)
  return dq, dk, dv, None


_block_attention.defvjp(_block_attention_fwd, _block_attention_bwd)


def head_logits(x_BTD, w_DV):
  """Final-normed hidden states -> logits [B, T, V] float32."""
  out = layers.project(x_BTD, w_DV, preferred_element_type=jnp.float32)
  return constrain(out.astype(jnp.float32), ("batch", "length", "vocab"))


def segment_causal_mask(segment_ids_BT):
  t = segment_ids_BT.shape[1]
  same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return same & jnp.tril(jnp.ones((t, t), bool))[None]


class Attention(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
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
    self.dtype = dtype

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

  def __call__(self, x_BTD, positions_BT, mask_BTS, *, causal: bool = False):
    """Self-attention over the given tokens; also returns (k, v) for a cache. causal: see `attend`."""
    q, k, v = self.qkv(x_BTD, positions_BT)
    return self.out(attend(q, k, v, mask_BTS, self.dtype, causal=causal)), (k, v)

  def decode(self, x_B1D, positions_B1, cache_kv, valid_BS, index_B):
    """One new token per row: writes its k/v at slot index_B, attends to the valid slots."""
    q, k, v = self.qkv(x_B1D, positions_B1)
    write = jax.vmap(lambda c, new, i: jax.lax.dynamic_update_slice_in_dim(c, new, i, axis=0))
    ck, cv = write(cache_kv[0], k.astype(cache_kv[0].dtype), index_B), write(cache_kv[1], v.astype(cache_kv[1].dtype),
                                                                             index_B)
    return self.out(attend(q, ck, cv, valid_BS[:, None, :], self.dtype)), (ck, cv)


class DecoderBlock(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, use_moe: bool, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn_norm = layers.RMSNorm(cfg.d_model, eps=cfg.rms_eps, **kw)
    self.attn = Attention(cfg, **kw)
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

  def __call__(self, x_BTD, positions_BT, mask_BTS, token_mask_BT):
    """mask_BTS: a causal mask (segment_causal_mask), as the decoder builds it."""
    a, kv = self.attn(self.attn_norm(x_BTD), positions_BT, mask_BTS, causal=True)
    x_BTD = constrain(x_BTD + a, ACT)
    x_BTD, aux = self._ffn(x_BTD, token_mask_BT)
    return x_BTD, aux, kv

  def decode(self, x_B1D, positions_B1, cache_kv, valid_BS, index_B):
    a, kv = self.attn.decode(self.attn_norm(x_B1D), positions_B1, cache_kv, valid_BS, index_B)
    x_B1D, aux = self._ffn(x_B1D + a, None)
    return x_B1D, aux, kv


class DecoderUnit(nnx.Module):
  """`every` consecutive layers; the last one has the MoE FFN when the config has MoE."""

  def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    n = cfg.moe.every if cfg.moe is not None else 1
    self.blocks = nnx.List([
        DecoderBlock(cfg, use_moe=cfg.moe is not None and i == n - 1, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs) for i in range(n)])

  def __call__(self, x_BTD, positions_BT, mask_BTS, token_mask_BT):
    kvs, auxes = [], []
    for block in self.blocks:
      x_BTD, aux, kv = block(x_BTD, positions_BT, mask_BTS, token_mask_BT)
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
               scan_layers: bool = True, rngs: nnx.Rngs):
    every = cfg.moe.every if cfg.moe is not None else 1
    if cfg.num_layers % every:
      raise ValueError(f"model.decoder.num_layers {cfg.num_layers} is not a multiple of moe.every {every}")
    self.every, self.has_moe = every, cfg.moe is not None
    self.num_kv_heads, self.head_dim = cfg.num_kv_heads, cfg.head_dim or cfg.d_model // cfg.num_heads
    self.dtype, pdt = layers.dtype_of(dtype), layers.dtype_of(param_dtype)
    self.remat, self.scan_layers = remat, scan_layers
    self.num_units = cfg.num_layers // every
    self.embedding = layers.param(rngs, layers.normal_init(0.02), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                                  pdt)
    self.units = layers.stacked(self.num_units,
                                lambda r: DecoderUnit(cfg, dtype=self.dtype, param_dtype=pdt, rngs=r), rngs)
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
    mask_BTS = segment_causal_mask(segment_ids_BT)
    token_mask_BT = segment_ids_BT != 0

    def body(unit, x, _):
      x, aux, kv = unit(x, positions_BT, mask_BTS, token_mask_BT)
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
