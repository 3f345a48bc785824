"""`count()`: exact against a hand-written decoder formula and an initialised model;
presets within 10% of their names."""
import dataclasses
import math

import jax
import numpy as np
import pytest
from flax import nnx

from mm15_jax.configs import presets
from mm15_jax.config import DecoderConfig
from mm15_jax.models.count import count
from mm15_jax.models.multimodal import MultimodalModel

from fixtures import FAST_COMPILE

NOMINAL = {"1b": 1e9, "3b": 3e9, "7b": 7e9, "30b": 30e9, "1b-moe": 1e9, "3b-moe": 3e9}


def decoder_formula(c: DecoderConfig) -> tuple[int, int]:
  """(total, active) decoder parameters, from the architecture's shapes written out by hand."""
  d, h, g, v = c.d_model, c.num_heads, c.num_kv_heads, c.vocab_size
  hd = c.head_dim or d // h
  attention = d * h * hd + 2 * d * g * hd + h * hd * d + (h * hd + 2 * g * hd if c.qkv_bias else 0)
  per_layer = attention + 2 * d  # + attention and FFN RMSNorm scales
  dense_ffn = 3 * d * c.ffn_dim
  embeddings = v * d * (1 if c.tie_embeddings else 2) + d  # + final norm
  if c.moe is None:
    n = embeddings + c.num_layers * (per_layer + dense_ffn)
    return n, n
  moe_layers = c.num_layers // c.moe.every
  expert = 3 * d * (c.moe.ffn_dim or c.ffn_dim)
  routers = moe_layers * d * c.moe.num_experts
  base = embeddings + c.num_layers * per_layer + (c.num_layers - moe_layers) * dense_ffn + routers
  return base + moe_layers * c.moe.num_experts * expert, base + moe_layers * c.moe.top_k * expert


@pytest.mark.parametrize("name", list(NOMINAL))
def test_paper_presets_match_their_names(name):
  cfg = presets.get(name)
  counts = count(cfg)
  assert (counts["decoder"]["total"], counts["decoder"]["active"]) == decoder_formula(cfg.decoder)
  nominal = NOMINAL[name]
  # MoE presets are named by the dense decoder they are upcycled from.
  size = decoder_formula(dataclasses.replace(cfg.decoder, moe=None))[0]
  assert abs(size / nominal - 1) <= 0.10, f"{name}: {size / 1e9:.2f}B parameters for a nominal {nominal / 1e9:.0f}B"
  if cfg.decoder.moe is None:
    assert counts["decoder"]["active"] == counts["decoder"]["total"]
  else:
    assert counts["decoder"]["total"] > 5 * counts["decoder"]["active"]
  # Encoder and connector are dense: active == total; "all" is the sum of the parts.
  for part in ("vision", "connector"):
    assert counts[part]["active"] == counts[part]["total"] > 0
  assert counts["all"]["total"] == sum(counts[p]["total"] for p in ("vision", "connector", "decoder"))


def test_count_equals_a_sum_over_an_initialised_model():
  cfg = presets.tiny(vocab_size=256)
  init = lambda: nnx.state(MultimodalModel(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  params = jax.jit(init, compiler_options=FAST_COMPILE)()  # real arrays; compiled init beats eager op dispatch
  totals, experts = {}, 0
  for path, var in nnx.to_flat_state(params):
    size = np.asarray(var.get_value()).size
    totals[path[0]] = totals.get(path[0], 0) + size
    if path[-1] in ("gate", "up", "down") and var.get_value().ndim == 4:  # [units, experts, ...]: an MoE FFN
      experts += size
  counts = count(cfg)
  moe = cfg.decoder.moe
  assert experts > 0 and experts % moe.num_experts == 0
  for part in ("vision", "connector", "decoder"):
    assert counts[part]["total"] == totals[part], part
  assert counts["decoder"]["active"] == totals["decoder"] - experts + experts * moe.top_k // moe.num_experts
  assert counts["all"]["total"] == math.fsum(totals.values())
