"""Sparse Mixture-of-Experts SwiGLU FFN (top-k routing), dropless by default.

Routing (Mixtral convention): router logits in float32, softmax over all experts, keep the top-k probabilities and
renormalise them to sum to 1 (`norm_topk=False`: keep them as they are, Qwen2-MoE's option); a token's output is the
weighted sum of its k experts' SwiGLU outputs. With `shared_expert_dim` > 0 (Qwen2-MoE), a shared SwiGLU expert that
every token passes through is added, scaled by sigmoid(x . shared_gate).

Dropless mode (capacity_factor == 0): the token-expert assignments are sorted by expert and every expert runs one
grouped matmul (kernels/grouped.py: jax.lax.ragged_dot on TPU/GPU, a loop over row chunks on CPU) over exactly its
tokens; nothing is dropped. On a mesh with data-parallel axes (and no expert or tensor axis) each data shard sorts
its own tokens. With an expert axis (mesh.expert > 1) the layer is expert-parallel (kernels/expert_parallel.py):
each device holds its experts' weights only and the assignments travel to them and back by all-to-all.
Capacity mode (capacity_factor > 0): every expert takes at most C = ceil(capacity_factor * tokens * k / experts)
assignments into a [experts, C, d] buffer; assignments are served first-choice-first, then in token order
(GShard/Switch priority); overflow assignments are dropped (their share of the output is zero) and counted in
moe_drop_rate. Padding tokens (token_mask False) take no capacity.

Auxiliary losses, over real tokens only (unweighted; the trainer multiplies by the config weights):
  load balance (Switch form, k-normalised): E * sum_e f_e * P_e, f_e = share of routed assignments that went to e,
    P_e = mean router probability of e; 1.0 when perfectly balanced. (HF Mixtral's value is k times this.)
  router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from mm15_jax import sharding
from mm15_jax.config import MoEConfig
from mm15_jax.kernels import expert_parallel, grouped
from mm15_jax.models import layers
from mm15_jax.sharding import constrain


class MoEFeedForward(nnx.Module):

  def __init__(self, d_model: int, dense_ffn_dim: int, cfg: MoEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    if not 1 <= cfg.top_k <= cfg.num_experts:
      raise ValueError(f"model.decoder.moe.top_k {cfg.top_k} must be in [1, num_experts={cfg.num_experts}]")
    e, f = cfg.num_experts, cfg.ffn_dim or dense_ffn_dim
    self.num_experts, self.top_k, self.capacity_factor = e, cfg.top_k, cfg.capacity_factor
    self.ep_capacity_factor = cfg.ep_capacity_factor
    grouped.resolve_impl(cfg.grouped_matmul)  # a bad config value fails here; "auto" is resolved when traced
    self.grouped_impl = cfg.grouped_matmul
    self.router = layers.param(rngs, layers.fan_in_init(d_model), (d_model, e), ("embed", None), param_dtype)
    self.gate = layers.param(rngs, layers.fan_in_init(d_model), (e, d_model, f), ("expert", "embed", "expert_mlp"),
                             param_dtype)
    self.up = layers.param(rngs, layers.fan_in_init(d_model), (e, d_model, f), ("expert", "embed", "expert_mlp"),
                           param_dtype)
    self.down = layers.param(rngs, layers.fan_in_init(f), (e, f, d_model), ("expert", "expert_mlp", "embed"),
                             param_dtype)
    self.dtype = dtype
    self.norm_topk = cfg.norm_topk
    self.shared = SharedExpert(d_model, cfg.shared_expert_dim, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs) if cfg.shared_expert_dim else None

  def route(self, x_ND):
    """-> (router logits [N, E] f32, expert ids [N, k], (renormalised) weights [N, k] f32)."""
    logits_NE = jnp.einsum("nd,de->ne", x_ND.astype(jnp.float32), self.router[...].astype(jnp.float32))
    probs_NE = jax.nn.softmax(logits_NE, axis=-1)
    top_p_NK, top_e_NK = jax.lax.top_k(probs_NE, self.top_k)
    if self.norm_topk:
      top_p_NK = top_p_NK / top_p_NK.sum(-1, keepdims=True)
    return logits_NE, top_e_NK, top_p_NK

  def __call__(self, x_BTD, token_mask_BT=None):
    """-> (y [B, T, D], aux {moe_load_balance_loss, moe_z_loss, moe_drop_rate})."""
    b, t, d = x_BTD.shape
    x_ND = x_BTD.reshape(b * t, d).astype(self.dtype)
    mask_N = (jnp.ones((b * t,), bool) if token_mask_BT is None else token_mask_BT.reshape(b * t).astype(bool))
    logits_NE, experts_NK, weights_NK = self.route(x_ND)
    if self.capacity_factor > 0:
      out_NKD, drop_rate = self._capacity(x_ND, experts_NK, mask_N)
    else:
      out_NKD, drop_rate = self._dropless(x_ND, experts_NK, mask_N)
    y_ND = jnp.einsum("nkd,nk->nd", out_NKD, weights_NK.astype(self.dtype))
    aux = self.aux_losses(logits_NE, experts_NK, mask_N)
    aux["moe_drop_rate"] = drop_rate
    y_BTD = y_ND.reshape(b, t, d)
    if self.shared is not None:
      y_BTD = y_BTD + self.shared(x_BTD)
    return constrain(y_BTD, ("batch", "length", "embed")), aux

  def aux_losses(self, logits_NE, experts_NK, mask_N):
    e, k = self.num_experts, self.top_k
    m_N = mask_N.astype(jnp.float32)
    n_real = jnp.maximum(m_N.sum(), 1.0)
    probs_NE = jax.nn.softmax(logits_NE, axis=-1)
    counts_E = jnp.einsum("nke,n->e", jax.nn.one_hot(experts_NK, e, dtype=jnp.float32), m_N)
    frac_E = counts_E / (n_real * k)
    prob_E = jnp.einsum("ne,n->e", probs_NE, m_N) / n_real
    z_N = jax.nn.logsumexp(logits_NE, axis=-1)
    return {"moe_load_balance_loss": e * jnp.sum(frac_E * prob_E),
            "moe_z_loss": jnp.sum(jnp.square(z_N) * m_N) / n_real}

  def _expert_weights(self):
    dt = self.dtype
    return self.gate[...].astype(dt), self.up[...].astype(dt), self.down[...].astype(dt)

  def _dropless(self, x_ND, experts_NK, mask_N):
    """-> (outputs [N, k, D], drop rate). Each data shard sorts and multiplies its own tokens' assignments
    (shard_map over the batch axes): sorted globally, the [N * k, D] and [N * k, F] assignment arrays of the whole
    batch would sit on every device. Dropless routing makes a token's output independent of the others, so both give
    the same result. An expert axis makes it expert-parallel (nothing dropped unless ep_capacity_factor > 0)."""
    weights = self._expert_weights()
    mesh = sharding.current_mesh()
    if expert_parallel.applies(mesh, x_ND.shape[0], self.num_experts):
      return expert_parallel.moe_ffn(x_ND, experts_NK, mask_N, *weights, mesh=mesh, impl=self.grouped_impl,
                                     capacity_factor=self.ep_capacity_factor)
    no_drops = jnp.zeros((), jnp.float32)
    local = functools.partial(_dropless, num_experts=self.num_experts, impl=self.grouped_impl)
    batch_axes = tuple(a for a in sharding.BATCH_AXES if mesh is not None and mesh.shape[a] > 1)
    shards = math.prod(mesh.shape[a] for a in batch_axes) if batch_axes else 1
    # Tensor parallelism would need its own collectives inside; such meshes sort globally.
    if shards == 1 or x_ND.shape[0] % shards or mesh.shape["expert"] * mesh.shape["tensor"] > 1:
      return local(x_ND, experts_NK, *weights), no_drops
    rows, replicated = P(batch_axes), P()
    # check_vma=False: the CPU grouped matmul's loop carries start unvarying (gradients stay exact, tested).
    per_shard = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows) + (replicated,) * 3, out_specs=rows,
                              check_vma=False)
    return per_shard(x_ND, experts_NK, *weights), no_drops

  def capacity(self, num_tokens: int) -> int:
    return max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

  def _capacity(self, x_ND, experts_NK, mask_N):
    n, k = experts_NK.shape
    e, cap = self.num_experts, self.capacity(n)
    # Priority order: all first choices (in token order), then all second choices, ...
    flat_e = jnp.where(mask_N[None, :], experts_NK.T, e).reshape(k * n)   # padding -> sentinel bucket e
    order = jnp.argsort(flat_e, stable=True)
    sizes = jnp.bincount(flat_e, length=e + 1)
    starts = jnp.cumsum(sizes) - sizes
    pos_sorted = jnp.arange(k * n) - starts[flat_e[order]]
    pos = jnp.zeros((k * n,), jnp.int32).at[order].set(pos_sorted.astype(jnp.int32))
    real = flat_e < e
    kept = real & (pos < cap)
    slot = jnp.where(kept, pos, cap)                     # cap is out of bounds: dropped by the scatter
    token = jnp.tile(jnp.arange(n), k)
    buf_ECD = jnp.zeros((e, cap, x_ND.shape[-1]), x_ND.dtype).at[jnp.minimum(flat_e, e - 1), slot].set(
        x_ND[token], mode="drop")
    buf_ECD = constrain(buf_ECD, ("expert", None, "embed"))
    gate, up, down = self._expert_weights()
    h_ECF = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf_ECD, gate)) * jnp.einsum("ecd,edf->ecf", buf_ECD, up)
    out_ECD = jnp.einsum("ecf,efd->ecd", h_ECF, down)
    out_AD = out_ECD.at[jnp.minimum(flat_e, e - 1), slot].get(mode="fill", fill_value=0)
    out_NKD = out_AD.reshape(k, n, -1).transpose(1, 0, 2)
    drop_rate = (real & ~kept).sum() / jnp.maximum(real.sum(), 1)
    return out_NKD, drop_rate.astype(jnp.float32)


def _dropless(x_ND, experts_NK, gate_EDF, up_EDF, down_EFD, *, num_experts: int, impl: str):
  """[N, D] tokens, [N, k] expert ids -> [N, k, D] expert outputs: assignments sorted by expert, one grouped matmul
  per weight."""
  n, k = experts_NK.shape
  flat_e = experts_NK.reshape(n * k)
  order = jnp.argsort(flat_e, stable=True)             # assignments grouped by expert
  xs_AD = x_ND[order // k]                             # A = n * k assignments
  group_sizes = jnp.bincount(flat_e, length=num_experts).astype(jnp.int32)
  matmul = lambda x, w: grouped.grouped_matmul(x, w, group_sizes, impl=impl)
  h_AF = jax.nn.silu(matmul(xs_AD, gate_EDF)) * matmul(xs_AD, up_EDF)
  out_AD = matmul(h_AF, down_EFD)
  out_AD = jnp.zeros_like(out_AD).at[order].set(out_AD)  # back to (token, choice) order
  return out_AD.reshape(n, k, -1)


class SharedExpert(nnx.Module):
  """A SwiGLU expert every token passes through, scaled by a sigmoid gate of the token (Qwen2-MoE)."""

  def __init__(self, d_model: int, ffn_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.ffn = layers.SwiGLU(d_model, ffn_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = layers.param(rngs, layers.fan_in_init(d_model), (d_model, 1), ("embed", None), param_dtype)
    self.dtype = dtype

  def __call__(self, x_BTD):
    x_BTD = x_BTD.astype(self.dtype)
    gate_BT1 = jax.nn.sigmoid(layers.project(x_BTD, self.gate[...].astype(self.dtype)))
    return gate_BT1 * self.ffn(x_BTD)


def upcycle(dense: layers.SwiGLU, cfg: MoEConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32) -> MoEFeedForward:
  """An MoE FFN whose experts all start as copies of `dense` (router freshly initialised from `rngs`)."""
  d_model, ffn_dim = dense.gate.shape
  if cfg.ffn_dim not in (0, ffn_dim):
    raise ValueError(f"upcycle: model.decoder.moe.ffn_dim {cfg.ffn_dim} differs from the dense FFN's {ffn_dim}")
  moe = MoEFeedForward(d_model, ffn_dim, cfg, dtype=dense.dtype, param_dtype=param_dtype, rngs=rngs)
  e = cfg.num_experts
  for name in ("gate", "up", "down"):
    w = getattr(dense, name)[...]
    getattr(moe, name).set_value(jnp.broadcast_to(w[None], (e,) + w.shape).astype(param_dtype))
  return moe
