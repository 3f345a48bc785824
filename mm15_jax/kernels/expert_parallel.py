"""Expert-parallel dropless MoE FFN: each device of the `expert` mesh axis holds E / ep experts' weights, and every
token-expert assignment travels to the device of its expert and back by all-to-all.

Per device (shard_map over the batch axes, the expert axis among them), with its A = n * k assignments:
  1. sorted by expert (so by destination device: device d holds experts [d * E_l, (d + 1) * E_l), E_l = E / ep);
  2. laid into a send buffer [ep, C, D], row p of block d the p-th assignment bound for device d, plus each row's
     local expert id ([ep, C], E_l marking an empty row);
  3. all_to_all over `expert`: device d receives block d of every device's buffer, [ep, C, D];
  4. the received rows sorted by local expert, one grouped matmul per weight (kernels/grouped.py), unsorted;
  5. all_to_all back, and each assignment reads its row of its destination's block.

The slot C is what a device may send to one other device per layer call. ep_capacity_factor 0 (the default) takes
C = A, the most any device can send anywhere: nothing is ever dropped (the buffers are ep times the assignments).
A factor f > 0 takes C = ceil(f * A / ep) (f = 1: a perfectly balanced router's share): assignments past C rows to
one device are dropped (their share of the output is zero) and counted in moe_drop_rate.

jax.lax.ragged_all_to_all would send only the rows that exist, but XLA:CPU has no kernel for it ("HLO opcode
ragged-all-to-all is not supported by XLA:CPU"), so the exchange here is the fixed-size all_to_all that every
backend runs and the tests check.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mm15_jax import sharding
from mm15_jax.kernels import grouped

AXIS = "expert"


def slot_rows(num_assignments: int, ep: int, capacity_factor: float) -> int:
  """C: rows one device sends to one other per call (all of them when capacity_factor is 0)."""
  if capacity_factor <= 0:
    return num_assignments
  return min(num_assignments, max(1, math.ceil(capacity_factor * num_assignments / ep)))


def batch_shards(mesh) -> tuple[tuple[str, ...], int]:
  axes = tuple(a for a in sharding.BATCH_AXES if mesh.shape[a] > 1)
  return axes, math.prod(mesh.shape[a] for a in axes)


def applies(mesh, num_tokens: int, num_experts: int) -> bool:
  """An `expert` axis of size > 1 that divides the experts, and tokens that divide over the batch axes."""
  if mesh is None or mesh.shape[AXIS] == 1:
    return False
  if num_experts % mesh.shape[AXIS]:
    raise ValueError(f"config key model.decoder.moe.num_experts={num_experts} does not divide over mesh.expert="
                     f"{mesh.shape[AXIS]}")
  return num_tokens % batch_shards(mesh)[1] == 0


def moe_ffn(x_ND, experts_NK, mask_N, gate_EDF, up_EDF, down_EFD, *, mesh, impl: str, capacity_factor: float):
  """-> ([N, k, D] each assignment's expert output, drop rate over the real (mask_N) assignments)."""
  axes, _ = batch_shards(mesh)
  ep = mesh.shape[AXIS]
  rows, experts = P(axes), P(AXIS, None, None)
  local = functools.partial(_local, ep=ep, impl=impl, capacity_factor=capacity_factor, batch_axes=axes)
  # check_vma=False: the CPU grouped matmul's loop carries start unvarying (gradients stay exact, tested).
  run = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, experts, experts, experts),
                      out_specs=(rows, P()), check_vma=False)
  return run(x_ND, experts_NK, mask_N, gate_EDF, up_EDF, down_EFD)


def _local(x_ND, experts_NK, mask_N, gate_EDF, up_EDF, down_EFD, *, ep: int, impl: str, capacity_factor: float,
           batch_axes):
  """One device: its n tokens' assignments out to the experts' devices, the local experts on what arrives, back."""
  n, k = experts_NK.shape
  d, e_local = x_ND.shape[-1], gate_EDF.shape[0]
  a = n * k
  c = slot_rows(a, ep, capacity_factor)
  flat_e = experts_NK.reshape(a)
  order = jnp.argsort(flat_e, stable=True)              # assignments grouped by expert, so by destination
  dest_S = flat_e[order] // e_local
  sent_D = jnp.bincount(dest_S, length=ep)
  slot_S = jnp.arange(a) - (jnp.cumsum(sent_D) - sent_D)[dest_S]   # row within its destination's block
  kept_S = slot_S < c
  row_S = jnp.where(kept_S, dest_S * c + slot_S, ep * c)          # ep * c: out of bounds, dropped by the scatter
  send_XD = jnp.zeros((ep * c, d), x_ND.dtype).at[row_S].set(x_ND[order // k], mode="drop")
  send_e_X = jnp.full((ep * c,), e_local, jnp.int32).at[row_S].set((flat_e[order] % e_local).astype(jnp.int32),
                                                                   mode="drop")
  exchange = lambda buf: jax.lax.all_to_all(buf, AXIS, 0, 0, tiled=True)  # block d -> device d
  recv_XD, recv_e_X = exchange(send_XD), exchange(send_e_X)
  out_XD = _local_experts(recv_XD, recv_e_X, gate_EDF, up_EDF, down_EFD, impl=impl)
  back_XD = exchange(out_XD)
  out_SD = back_XD.at[row_S].get(mode="fill", fill_value=0)
  out_AD = jnp.zeros_like(out_SD).at[order].set(out_SD)          # back to (token, choice) order
  real_S = mask_N[order // k]
  dropped = jnp.stack([(real_S & ~kept_S).sum(), real_S.sum()]).astype(jnp.float32)
  dropped = jax.lax.psum(dropped, batch_axes)
  return out_AD.reshape(n, k, d), dropped[0] / jnp.maximum(dropped[1], 1.0)


def _local_experts(x_XD, expert_X, gate_EDF, up_EDF, down_EFD, *, impl: str):
  """Rows [X, D] with local expert ids (E_l: an empty row) -> SwiGLU of each row's expert, [X, D] (0 for empty)."""
  e_local = gate_EDF.shape[0]
  order = jnp.argsort(expert_X, stable=True)           # empty rows last: past sum(group sizes), they come out 0
  xs_XD = x_XD[order]
  group_sizes = jnp.bincount(expert_X, length=e_local + 1)[:e_local].astype(jnp.int32)
  matmul = lambda x, w: grouped.grouped_matmul(x, w, group_sizes, impl=impl)
  h_XF = jax.nn.silu(matmul(xs_XD, gate_EDF)) * matmul(xs_XD, up_EDF)
  out_XD = matmul(h_XF, down_EFD)
  return jnp.zeros_like(out_XD).at[order].set(out_XD)
