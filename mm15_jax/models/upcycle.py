"""Upcycling a dense checkpoint of this project into an MoE model (Komatsuzaki et al., 2023, "Sparse Upcycling").

The MoE decoder's unit of `every` layers holds dense blocks 0 .. every-2 and an MoE block every-1; the dense
decoder's unit is one layer. Layer l = u * every + j of the dense model becomes block j of unit u; in the MoE block
every expert is a copy of that layer's dense FFN (gate, up, down) and the router keeps its fresh initialisation.
With top-k weights renormalised to 1 (moe.py), each MoE layer then computes exactly its dense FFN: the upcycled
model's logits equal the dense model's at step 0, and training lets the experts diverge.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mm15_jax.config import DecoderConfig

BLOCKS = ("decoder", "units", "blocks")
EXPERT_WEIGHTS = ("gate", "up", "down")


def check_compatible(dense: DecoderConfig, moe: DecoderConfig, where: str) -> None:
  """The MoE decoder must be the dense one with MoE FFNs whose experts have the dense FFN's width."""
  if dense.moe is not None or moe.moe is None:
    raise ValueError(f"{where}: upcycling takes a dense checkpoint into an MoE model")
  same = ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim", "vocab_size", "qkv_bias",
          "tie_embeddings")
  differ = [f"{k} {getattr(dense, k)} vs {getattr(moe, k)}" for k in same if getattr(dense, k) != getattr(moe, k)]
  if differ:
    raise ValueError(f"{where}: the dense checkpoint's decoder differs from this stage's beyond its FFNs "
                     f"({', '.join(differ)})")
  if moe.moe.ffn_dim not in (0, dense.ffn_dim):
    raise ValueError(f"{where}: upcycled experts copy the dense FFN (ffn_dim {dense.ffn_dim}); "
                     f"model.decoder.moe.ffn_dim is {moe.moe.ffn_dim}")
  if dense.num_layers % moe.moe.every:
    raise ValueError(f"{where}: model.decoder.moe.every={moe.moe.every} does not divide the {dense.num_layers} "
                     "layers")


def upcycle_params(dense: nnx.State, fresh: nnx.State, dense_cfg: DecoderConfig, moe_cfg: DecoderConfig, *,
                   where: str = "upcycle") -> nnx.State:
  """`fresh` (an initialised MoE model's parameters) with every parameter but the routers set from `dense`."""
  check_compatible(dense_cfg, moe_cfg, where)
  every, experts = moe_cfg.moe.every, moe_cfg.moe.num_experts
  source = {path: var.get_value() for path, var in nnx.to_flat_state(dense)}
  for path, var in nnx.to_flat_state(fresh):
    if path[:len(BLOCKS)] != BLOCKS:
      var.set_value(source[path])
      continue
    j, rest = path[len(BLOCKS)], path[len(BLOCKS) + 1:]
    if rest == ("ffn", "router"):
      continue
    layers_L = source[BLOCKS + (0,) + rest][j::every]  # dense layers u * every + j, u = 0 .. units-1
    if j == every - 1 and rest[0] == "ffn" and rest[-1] in EXPERT_WEIGHTS:
      layers_L = jnp.broadcast_to(layers_L[:, None], (layers_L.shape[0], experts) + layers_L.shape[1:])
    var.set_value(layers_L)
  return fresh
