"""Model presets: the paper's sizes (decoder shapes per the recipe notes) and the tiny CPU model.

    mm15 params --model 3b-moe

A preset's name is the size of its LLM: decoder parameters (embeddings included); an MoE preset is named by the
dense model it is upcycled from (64 full-width experts, top-2, every second layer: experts start as copies of the
dense FFN), so 1b-moe has 1.48B active of 26.5B parameters and 3b-moe 4.18B active of 70B. tests/test_count.py keeps
every name within 10% with the vocabulary below. The recipe's decoder shapes are "until better facts"; to fit its
name, 1b ties the input embedding and the LM head (untied: 1.17B, the two 49k x 2048 tables being 17% of it; tied:
1.07B). The larger presets stay untied (3b: 3.12B, 7b: 6.88B, 30b: 32.8B).
"""
from __future__ import annotations

from mm15_jax.config import ConnectorConfig, DecoderConfig, ModelConfig, MoEConfig, VisionConfig

# DFN5B-CLIP-ViT-H-14-378: the public stand-in for the paper's image encoder.
VIT_H_378 = VisionConfig(image_size=378, patch_size=14, width=1280, depth=32, num_heads=16, mlp_dim=5120)

DECODERS = {
    "1b": dict(d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, ffn_dim=8192, tie_embeddings=True),
    "3b": dict(d_model=3072, num_layers=28, num_heads=24, num_kv_heads=8, ffn_dim=8192),
    "7b": dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, ffn_dim=11008),
    "30b": dict(d_model=6656, num_layers=60, num_heads=52, num_kv_heads=52, ffn_dim=17920),
}
NOMINAL_PARAMS = {"1b": 1e9, "3b": 3e9, "7b": 7e9, "30b": 30e9}
VOCAB = 49_152  # until a tokenizer is chosen; `mm15 train` takes the tokenizer's size


def paper(size: str, vocab_size: int = VOCAB) -> ModelConfig:
  """`1b`, `3b`, `7b`, `30b` dense, or `1b-moe`, `3b-moe` (64 experts, top-2, every second layer)."""
  base, _, moe = size.partition("-")
  if base not in DECODERS or moe not in ("", "moe"):
    raise KeyError(f"unknown model preset {size!r}; known: {names()}")
  decoder = DecoderConfig(vocab_size=vocab_size, max_len=4096, **DECODERS[base])
  if moe:
    decoder.moe = MoEConfig(num_experts=64, top_k=2, every=2)  # full-width experts: upcycled from the dense FFN
  return ModelConfig(vision=VIT_H_378, connector=ConnectorConfig(hidden=1024, depth=3, pooled_side=12),
                     decoder=decoder, dtype="bfloat16", remat="full")


def tiny(vocab_size: int = 0) -> ModelConfig:
  """The recipe's structure at CPU scale: 16 tokens per tile, one MoE layer in every pair, float32 compute; image
  tokens centred per tile (ConnectorConfig.center_tokens), without which it does not learn where things are."""
  return ModelConfig(
      vision=VisionConfig(image_size=32, patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=256),
      connector=ConnectorConfig(hidden=64, depth=1, pooled_side=4, center_tokens=True),
      decoder=DecoderConfig(vocab_size=vocab_size, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2,
                            ffn_dim=384, max_len=1024, moe=MoEConfig(num_experts=8, top_k=2, every=2)),
      dtype="float32", remat="none")


def names() -> list[str]:
  return [*DECODERS, *(f"{k}-moe" for k in ("1b", "3b")), "tiny"]


def get(name: str) -> ModelConfig:
  return tiny(vocab_size=2048) if name == "tiny" else paper(name)
