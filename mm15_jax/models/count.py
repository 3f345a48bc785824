"""Parameter counts per part, total and active (top-k of the experts), from abstract shapes only."""
from __future__ import annotations

import math

import jax
from flax import nnx

from mm15_jax.config import ModelConfig
from mm15_jax.models.multimodal import MultimodalModel

PARTS = ("vision", "connector", "decoder")


def count(cfg: ModelConfig) -> dict[str, dict[str, int]]:
  """{part: {"total": n, "active": n}}; nothing is allocated (nnx.eval_shape)."""
  abstract = nnx.eval_shape(lambda: MultimodalModel(cfg, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  specs = nnx.get_partition_spec(params)
  moe = cfg.decoder.moe
  out = {p: {"total": 0, "active": 0} for p in PARTS}
  leaves = jax.tree_util.tree_leaves_with_path(params)
  spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  for (path, leaf), spec in zip(leaves, spec_leaves):
    part = str(getattr(path[0], "key", path[0]))
    n = math.prod(leaf.shape)
    active = n * moe.top_k // moe.num_experts if moe is not None and "expert" in tuple(spec) else n
    out[part]["total"] += n
    out[part]["active"] += active
  out["all"] = {k: sum(out[p][k] for p in PARTS) for k in ("total", "active")}
  return out


def print_counts(name: str) -> None:
  from mm15_jax.configs import presets
  counts = count(presets.get(name))
  print(f"{name}: parameters (M)          total      active")
  for part, c in counts.items():
    print(f"  {part:<22} {c['total'] / 1e6:>10.1f} {c['active'] / 1e6:>11.1f}")
