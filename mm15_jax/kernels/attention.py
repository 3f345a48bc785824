"""Attention kernels, chosen per platform by the config field `model.attention`.

  dense    scores over the whole [T, S] square, masked, softmax in float32 (every platform; decode steps always)
  blocked  causal only: queries in blocks of CAUSAL_BLOCK, each against the keys up to the end of its own block, so
           the all-masked blocks above the diagonal are never computed; head-major layout and a hand-written
           backward keep XLA:CPU from transposing the scores. On CPU dense attention cost more than all other matmuls
           of a layer at T = 1024 (blocked: ~3x faster attention forward + backward, ~1.25x faster train step;
           bench/train_step.py). Non-causal attention (the ViT) runs dense.
  splash   Pallas splash attention (kernels/splash.py): TPU; on other platforms it runs in Pallas interpret mode,
           which is slow and only meant for tests.
  cudnn    jax.nn.dot_product_attention(implementation="cudnn"): GPU, bfloat16/float16 operands, head_dim a multiple
           of 8 up to 128; other shapes and dtypes run dense.
  auto     blocked on CPU, splash on TPU, cudnn on GPU.

All give the same values and gradients up to float rounding. The platform is that of the active mesh's devices (an
ahead-of-time compile for TPU on a CPU host gets splash), else the default backend. Query head h uses kv head
h // (H / G) (HF repeat_kv order).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mm15_jax.models import layers

IMPLS = ("auto", "dense", "blocked", "splash", "cudnn")
AUTO = {"cpu": "blocked", "tpu": "splash", "gpu": "cudnn"}
CAUSAL_BLOCK = 128       # query / key block of the blocked causal attention ...
MAX_CAUSAL_BLOCKS = 16   # ... grown for long rows so that a layer traces at most this many blocks
NEG_INF = float(jnp.finfo(jnp.float32).min)


def check_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"config key model.attention={impl!r} is not one of {IMPLS}")
  return impl


def resolve(impl: str, platform: str | None = None) -> str:
  """The kernel `impl` means on `platform` (default: the active mesh's): "auto" picks the platform's own."""
  platform = platform or layers.mesh_platform()
  if check_impl(impl) == "auto":
    return AUTO.get(platform, "dense")
  if impl == "cudnn" and AUTO.get(platform) != "cudnn":
    raise ValueError(f"config key model.attention='cudnn' needs a GPU; this program is built for {platform} "
                     f"(use auto, dense or blocked)")
  return impl


def segment_causal_mask(segment_ids_BT):
  """[B, T, T]: a token sees earlier-or-same positions of its own segment (padding, segment 0, sees padding)."""
  t = segment_ids_BT.shape[1]
  same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return same & jnp.tril(jnp.ones((t, t), bool))[None]


def causal_attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, dtype, *, impl: str = "auto", mask_BTS=None,
                     block: int = CAUSAL_BLOCK):
  """Causal self-attention of packed rows (tokens see their own segment only). mask_BTS: segment_causal_mask of
  segment_ids_BT when the caller has it (built once for all layers); the splash kernel takes the ids instead."""
  impl = resolve(impl)
  if impl == "splash":
    from mm15_jax.kernels import splash
    return splash.attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, causal=True).astype(dtype)
  mask_BTS = segment_causal_mask(segment_ids_BT) if mask_BTS is None else mask_BTS
  if impl == "cudnn" and cudnn_applies(q_BTHK):
    return _cudnn(q_BTHK, k_BTGK, v_BTGK, mask_BTS, causal=True).astype(dtype)
  return attend(q_BTHK, k_BTGK, v_BTGK, mask_BTS, dtype, causal=True, impl=impl, block=block)


def full_attention(q_BLHK, k_BLHK, v_BLHK, dtype, *, impl: str = "auto"):
  """Bidirectional attention over whole rows (the ViT's), scores scaled by head_dim ** -0.5 here."""
  impl = resolve(impl)
  if impl == "splash":
    from mm15_jax.kernels import splash
    return splash.attention(q_BLHK, k_BLHK, v_BLHK, None, causal=False).astype(dtype)
  if impl == "cudnn" and cudnn_applies(q_BLHK):
    return _cudnn(q_BLHK, k_BLHK, v_BLHK, None, causal=False).astype(dtype)
  scale = q_BLHK.shape[-1] ** -0.5
  logits_BHLM = jnp.einsum("blhk,bmhk->bhlm", q_BLHK * scale, k_BLHK, preferred_element_type=jnp.float32)
  probs_BHLM = jax.nn.softmax(logits_BHLM, axis=-1).astype(dtype)
  return jnp.einsum("bhlm,bmhk->blhk", probs_BHLM, v_BLHK)


def cudnn_applies(q_BTHK) -> bool:
  return q_BTHK.dtype in (jnp.bfloat16, jnp.float16) and q_BTHK.shape[-1] % 8 == 0 and q_BTHK.shape[-1] <= 128


def _cudnn(q_BTHK, k_BSGK, v_BSGK, mask_BTS, *, causal: bool):
  mask = None if mask_BTS is None else mask_BTS[:, None]
  return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask, is_causal=causal, implementation="cudnn")


def attend(q_BTHK, k_BSGK, v_BSGK, mask_BTS, dtype, *, causal: bool = False, impl: str = "auto",
           block: int = CAUSAL_BLOCK):
  """Grouped-query attention under an explicit mask, dense or blocked. Softmax in float32.

  causal=True promises that mask_BTS hides every key after its query (as segment_causal_mask does): the blocked
  kernel may then skip the key blocks above the diagonal. Other implementations run dense here.
  """
  t, s = q_BTHK.shape[1], k_BSGK.shape[1]
  block = max(block, -(-t // MAX_CAUSAL_BLOCKS))
  if causal and t == s and t > block and resolve(impl) == "blocked":
    return _attend_causal_blocked(q_BTHK, k_BSGK, v_BSGK, mask_BTS, dtype, block)
  return attend_dense(q_BTHK, k_BSGK, v_BSGK, mask_BTS, dtype)


def attend_dense(q_BTHK, k_BSGK, v_BSGK, mask_BTS, dtype):
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
