"""Grouped matmul for dropless MoE: rows sorted by expert, each group multiplied by its expert's weights.

`ragged` uses jax.lax.ragged_dot (the fast kernel on TPU/GPU). XLA:CPU lowers ragged_dot to a masked dense product
over every expert (E times the FLOPs), so on CPU `blocked` is used instead: each group is cut into chunks of `block`
rows (a group's last chunk may run into the next group's rows, which it computes but does not write), and a loop
over the chunks that exist multiplies each by its expert's weights, read in place. The loop's trip count is the
number of chunks of this batch, so the work is at most E * (block - 1) rows more than the rows themselves, and no
weight is copied per chunk. Its gradient is a second loop (custom VJP). Both implementations are exact.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mm15_jax.models import layers

MAX_BLOCK = 256


def resolve_impl(impl: str) -> str:
  """"auto": the blocked kernel on CPU, ragged_dot elsewhere, by the platform the step is traced for
  (`layers.mesh_platform`: an ahead-of-time TPU compile on a CPU host gets ragged_dot)."""
  if impl == "auto":
    return "blocked" if layers.mesh_platform() == "cpu" else "ragged"
  if impl not in ("ragged", "blocked"):
    raise ValueError(f"model.decoder.moe.grouped_matmul={impl!r}; expected auto, ragged or blocked")
  return impl


def default_block(num_rows: int, num_groups: int) -> int:
  """Chunk rows: a power of two near half the mean group size, in [32, MAX_BLOCK]. Smaller chunks waste fewer
  rows at the end of each group, larger ones are faster matmuls (measured in bench/moe.py)."""
  half_mean = max(num_rows // (2 * num_groups), 1)
  return min(max(1 << (half_mean.bit_length() - 1), 32), MAX_BLOCK)


def grouped_matmul(x_AD, w_EDF, group_sizes_E, *, impl: str = "auto", block: int | None = None):
  """x [A, D] (rows sorted by group) @ w[group of row] -> [A, F]; rows past sum(group_sizes) come out zero."""
  if resolve_impl(impl) == "ragged":
    return jax.lax.ragged_dot(x_AD, w_EDF, group_sizes_E)
  block = block or default_block(x_AD.shape[0], w_EDF.shape[0])
  return _blocked(x_AD, w_EDF, _chunks(group_sizes_E, x_AD.shape[0], block), block)


def _chunks(group_sizes_E, num_rows: int, block: int):
  """Per chunk j (static bound ceil(A / block) + E): (expert, first row, rows it owns); and the number of chunks."""
  e = group_sizes_E.shape[0]
  max_chunks = -(-num_rows // block) + e
  end_E = jnp.cumsum(group_sizes_E)
  start_E = end_E - group_sizes_E
  chunks_E = (group_sizes_E + block - 1) // block
  chunk_end_E = jnp.cumsum(chunks_E)
  j = jnp.arange(max_chunks)
  expert_J = jnp.minimum(jnp.searchsorted(chunk_end_E, j, side="right"), e - 1)
  row_J = start_E[expert_J] + (j - (chunk_end_E - chunks_E)[expert_J]) * block
  owned_J = jnp.minimum(end_E[expert_J] - row_J, block)
  as_int = lambda a: a.astype(jnp.int32)
  return as_int(expert_J), as_int(row_J), as_int(owned_J), as_int(chunk_end_E[-1])


def _pad(a, block: int):
  """block zero rows at the end: a chunk starting near the end reads them instead of being shifted back (which is
  what dynamic_slice does to an out-of-bounds start)."""
  return jnp.concatenate([a, jnp.zeros((block,) + a.shape[1:], a.dtype)])


def _rows(a, start, block: int):
  return jax.lax.dynamic_slice_in_dim(a, start, block)


def _write_owned(out, rows, start, owned_B1):
  """out[start:start + block] = rows where owned, else unchanged."""
  kept = jnp.where(owned_B1, rows, _rows(out, start, rows.shape[0]))
  return jax.lax.dynamic_update_slice_in_dim(out, kept, start, axis=0)


def _expert(w_EDF, e):
  return jax.lax.dynamic_index_in_dim(w_EDF, e, keepdims=False)


def _owned_mask(owned, block: int):
  return (jnp.arange(block) < owned)[:, None]  # [block, 1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(x_AD, w_EDF, chunks, block: int):
  expert_J, row_J, owned_J, num_chunks = chunks
  a = x_AD.shape[0]
  x_PD = _pad(x_AD, block)

  def body(j, y_PF):
    y_BF = _rows(x_PD, row_J[j], block) @ _expert(w_EDF, expert_J[j])
    return _write_owned(y_PF, y_BF, row_J[j], _owned_mask(owned_J[j], block))

  y_PF = jax.lax.fori_loop(0, num_chunks, body, jnp.zeros((a + block, w_EDF.shape[-1]), x_AD.dtype))
  return y_PF[:a]


def _blocked_fwd(x_AD, w_EDF, chunks, block):
  return _blocked(x_AD, w_EDF, chunks, block), (x_AD, w_EDF, chunks)


def _blocked_bwd(block, residuals, dy_AF):
  x_AD, w_EDF, (expert_J, row_J, owned_J, num_chunks) = residuals
  a = x_AD.shape[0]
  x_PD, dy_PF = _pad(x_AD, block), _pad(dy_AF, block)

  def body(j, carry):
    dx_PD, dw_EDF = carry
    e, start = expert_J[j], row_J[j]
    owned = _owned_mask(owned_J[j], block)
    dy_BF = jnp.where(owned, _rows(dy_PF, start, block), 0)  # rows of the next group add nothing to dw[e]
    dx_PD = _write_owned(dx_PD, dy_BF @ _expert(w_EDF, e).T, start, owned)
    dw_DF = _expert(dw_EDF, e) + _rows(x_PD, start, block).T @ dy_BF
    return dx_PD, jax.lax.dynamic_update_index_in_dim(dw_EDF, dw_DF, e, axis=0)

  init = (jnp.zeros_like(x_PD), jnp.zeros_like(w_EDF))
  dx_PD, dw_EDF = jax.lax.fori_loop(0, num_chunks, body, init)
  return dx_PD[:a], dw_EDF, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
