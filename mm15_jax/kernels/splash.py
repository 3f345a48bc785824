"""Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention) for the decoder and the ViT.

The kernel works on one row: q [heads, T, head_dim] against k, v [kv_heads, T, head_dim] (or one shared kv head: the
MQA form, used per kv group for grouped-query attention), with a static mask (causal, or full) and per-token segment
ids. It is mapped over the rows (and kv groups) and, on a mesh, run under shard_map over the batch axes and the
tensor axis (heads), each device calling it on its own rows and heads; keys are never split.

Rows are padded to a multiple of BLOCK_MULTIPLE (the kernel's tile); padding positions get segment id 0, which the
decoder's own padding already has: its causal mask keeps real tokens from seeing them, and the ViT's rows, which have
no segment ids, get 1 on real tokens. Off TPU the kernel runs in Pallas interpret mode (tests only: slow).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib
from jax.sharding import PartitionSpec as P

from mm15_jax import sharding
from mm15_jax.models import layers

BLOCK_MULTIPLE = 128
BLOCKS = (512, 256, 128)  # the largest that divides the padded row is the kernel's q / kv block, forward and back


def block_size(t: int) -> int:
  return next(b for b in BLOCKS if t % b == 0)


def attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, *, causal: bool):
  """Self-attention (T queries against the same T keys) -> [B, T, H, K] float32. segment_ids_BT: tokens attend
  within their segment only (None: one segment per row)."""
  b, t, h, hd = q_BTHK.shape
  g = k_BTGK.shape[2]
  pad = -t % BLOCK_MULTIPLE
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((b, t), jnp.int32)
  segment_ids_BT = jnp.pad(segment_ids_BT.astype(jnp.int32), ((0, 0), (0, pad)))
  padded = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
  q_BTHK = q_BTHK * jnp.asarray(hd ** -0.5, q_BTHK.dtype)  # the kernel does not scale the scores
  q, k, v = padded(q_BTHK), padded(k_BTGK), padded(v_BTGK)
  local = functools.partial(_rows, causal=causal, interpret=layers.mesh_platform() != "tpu")
  mesh = sharding.current_mesh()
  if mesh is not None and mesh.size > 1:
    batch_axes = tuple(a for a in sharding.BATCH_AXES if mesh.shape[a] > 1)
    if b % math.prod(mesh.shape[a] for a in batch_axes):
      batch_axes = ()
    heads_axis = "tensor" if mesh.shape["tensor"] > 1 and g % mesh.shape["tensor"] == 0 else None
    rows = P(batch_axes or None, None, heads_axis, None)
    local = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, P(batch_axes or None, None)),
                          out_specs=rows, check_vma=False)
  return local(q, k, v, segment_ids_BT)[:, :t]


def train_flops_per_forward(remat: str) -> float:
  """A train step's FLOPs in these kernels per forward FLOP (XLA's cost analysis does not see inside them). The
  forward computes 2 score-sized matmuls (q k^T, p v); the backward's separate dq and dkv kernels (_rows' block
  sizes) recompute the scores and add 1 + 1 and 2 + 1 more (dq: do v^T, ds k; dkv: p^T do, do v^T, ds^T q): 7 in
  all; rematerialised blocks run the forward once more."""
  return (2 + 7 + (0 if remat == "none" else 2)) / 2


def _rows(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, *, causal: bool, interpret: bool):
  """The kernel on this device's rows: [B, T, H, K] x [B, T, G, K] -> [B, T, H, K] float32."""
  b, t, h, hd = q_BTHK.shape
  g = k_BTGK.shape[2]
  r = h // g
  head_mask = splash_lib.CausalMask((t, t)) if causal else splash_lib.FullMask((t, t))
  bs = block_size(t)
  blocks = splash_lib.BlockSizes(block_q=bs, block_kv=bs, block_kv_compute=bs, block_q_dkv=bs, block_kv_dkv=bs,
                                 block_kv_dkv_compute=bs, block_q_dq=bs, block_kv_dq=bs)
  heads_first = lambda x: x.transpose(0, 2, 1, 3)  # [B, heads, T, K]
  q_BHTK, k_BGTK, v_BGTK = heads_first(q_BTHK), heads_first(k_BTGK), heads_first(v_BTGK)
  segments = splash_lib.SegmentIds(q=segment_ids_BT, kv=segment_ids_BT)
  if r == 1:
    kernel = splash_lib.make_splash_mha_single_device(
        splash_lib.MultiHeadMask([head_mask] * h), block_sizes=blocks, interpret=interpret)
    out_BHTK = jax.vmap(kernel)(q_BHTK, k_BGTK, v_BGTK, segments)
  else:  # grouped-query: the MQA kernel per kv group, its R query heads sharing the group's k and v
    kernel = splash_lib.make_splash_mqa_single_device(
        splash_lib.MultiHeadMask([head_mask] * r), block_sizes=blocks, interpret=interpret)
    per_group = jax.vmap(kernel, in_axes=(0, 0, 0, None))
    q_BGRTK = q_BHTK.reshape(b, g, r, t, hd)
    out_BHTK = jax.vmap(per_group)(q_BGRTK, k_BGTK, v_BGTK, segments).reshape(b, h, t, hd)
  return heads_first(out_BHTK)
