"""Analytic FLOPs of one train step and model FLOPs utilisation (MFU).

Counted: matmuls and convolutions only (2 FLOPs per multiply-add), as MFU conventions do (PaLM appendix B, MaxText):
  ViT on every tile slot of the batch (padded slots are encoded too: shapes are static), patch embedding included;
  C-Abstractor 1x1 / depthwise 3x3 convs, squeeze-excite, adaptive pooling (a matmul here) and MLP readout;
  decoder q/k/v/o projections, attention scores and weighted values (causal: half of the T x T square, the useful
  work; `causal_attention=False` counts the full square that the masked einsum actually computes), SwiGLU FFNs,
  router and top-k experts of MoE layers (what a token uses, not what a capacity buffer pads), LM head.
Not counted: norms, activations, softmax, embedding gathers, the optimiser update (O(params), not O(tokens x params)).
Train step = 3 x forward (backward: one matmul for the input gradient and one for the weight gradient per forward
matmul); that over-counts the patch embedding, whose input (pixels) needs no gradient, by its share (tiny).
"""
from __future__ import annotations

import os

from mm15_jax.config import ConnectorConfig, DecoderConfig, ModelConfig, VisionConfig

# Dense bf16 peak per chip / GPU, TFLOP/s (vendor data sheets; H100 SXM without sparsity).
PEAK_TFLOPS_BY_KIND = {
    "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v4": 275.0, "TPU v6 lite": 918.0,
    "TPU v6e": 918.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0,
}


def _vit_blocks_and_length(v: VisionConfig, tile_size: int) -> tuple[int, int]:
  grid = tile_size // v.patch_size
  return v.feature_layer % (v.depth + 1), grid * grid + 1  # blocks run up to the feature layer; + class token


def vit_attention_core_flops_per_tile(v: VisionConfig, tile_size: int) -> int:
  """Scores + weighted values of every block, all heads (bidirectional)."""
  blocks, length = _vit_blocks_and_length(v, tile_size)
  return blocks * 2 * 2 * length * length * v.width


def vit_forward_flops_per_tile(v: VisionConfig, tile_size: int) -> int:
  blocks, length = _vit_blocks_and_length(v, tile_size)
  embed = 2 * (length - 1) * v.patch_size ** 2 * 3 * v.width
  attn_proj = 2 * length * v.width * v.width * 4           # q, k, v, o
  mlp = 2 * 2 * length * v.width * v.mlp_dim
  return embed + blocks * (attn_proj + mlp) + vit_attention_core_flops_per_tile(v, tile_size)


def _bottleneck_flops(side: int, in_ch: int, out_ch: int, se_ratio: float) -> int:
  pixels = side * side
  se = int(round(in_ch * se_ratio))
  flops = 2 * pixels * in_ch * out_ch          # conv1 1x1
  flops += 2 * pixels * 9 * out_ch             # depthwise 3x3
  flops += 2 * 2 * out_ch * se                 # squeeze-excite reduce + expand (on the pooled vector)
  flops += 2 * pixels * out_ch * out_ch        # conv3 1x1
  if in_ch != out_ch:
    flops += 2 * pixels * in_ch * out_ch       # shortcut 1x1
  return flops


def connector_forward_flops_per_tile(c: ConnectorConfig, *, grid_side: int, in_dim: int, out_dim: int) -> int:
  p = c.pooled_side
  flops = 0
  for i in range(c.depth):
    flops += _bottleneck_flops(grid_side, in_dim if i == 0 else c.hidden, c.hidden, c.se_ratio)
  flops += 2 * p * grid_side * grid_side * c.hidden + 2 * p * p * grid_side * c.hidden  # pooling, rows then cols
  for _ in range(c.depth):
    flops += _bottleneck_flops(p, c.hidden, c.hidden, c.se_ratio)
  flops += 2 * p * p * (c.hidden * out_dim + out_dim * out_dim)  # readout MLP
  return flops


def decoder_attention_core_flops(d: DecoderConfig, *, seq_len: int, causal_attention: bool = True) -> int:
  """Scores + weighted values of one sequence, every layer."""
  q_width = d.num_heads * (d.head_dim or d.d_model // d.num_heads)
  per_layer = 2 * 2 * seq_len * seq_len * q_width
  return d.num_layers * (per_layer // 2 if causal_attention else per_layer)


def decoder_forward_flops(d: DecoderConfig, *, seq_len: int, causal_attention: bool = True) -> int:
  """One sequence of `seq_len` tokens through the decoder and LM head."""
  head_dim = d.head_dim or d.d_model // d.num_heads
  q_width, kv_width = d.num_heads * head_dim, d.num_kv_heads * head_dim
  per_token_proj = 2 * d.d_model * (2 * q_width + 2 * kv_width)  # q, o and k, v
  dense_ffn = 2 * 3 * d.d_model * d.ffn_dim
  num_moe = d.num_layers // d.moe.every if d.moe is not None else 0
  moe_ffn = 0
  if d.moe is not None:
    moe_ffn = 2 * d.d_model * d.moe.num_experts + d.moe.top_k * 2 * 3 * d.d_model * (d.moe.ffn_dim or d.ffn_dim)
    if d.moe.shared_expert_dim:  # its SwiGLU and its gate
      moe_ffn += 2 * 3 * d.d_model * d.moe.shared_expert_dim + 2 * d.d_model
  per_token = d.num_layers * per_token_proj + (d.num_layers - num_moe) * dense_ffn + num_moe * moe_ffn
  per_token += 2 * d.d_model * d.vocab_size  # LM head
  return seq_len * per_token + decoder_attention_core_flops(d, seq_len=seq_len, causal_attention=causal_attention)


def forward_flops(cfg: ModelConfig, *, batch_size: int, seq_len: int, max_images: int, tile_size: int,
                  causal_attention: bool = True) -> int:
  """Forward FLOPs of a batch [batch_size, seq_len] with `max_images` tile slots per row of side `tile_size`."""
  v = cfg.vision
  tiles = batch_size * max_images
  per_tile = vit_forward_flops_per_tile(v, tile_size) + connector_forward_flops_per_tile(
      cfg.connector, grid_side=tile_size // v.patch_size, in_dim=v.width, out_dim=cfg.decoder.d_model)
  text = batch_size * decoder_forward_flops(cfg.decoder, seq_len=seq_len, causal_attention=causal_attention)
  return tiles * per_tile + text


def stage_shapes(stage) -> dict[str, int]:
  """A StageConfig's step as the shape keywords of train_step_flops and attention_core_forward_flops."""
  return dict(batch_size=stage.batch_size, seq_len=stage.data.seq_len, max_images=stage.data.max_images,
              tile_size=stage.image_size)


def train_step_flops(cfg: ModelConfig, *, batch_size: int, seq_len: int, max_images: int, tile_size: int,
                     causal_attention: bool = True) -> int:
  """Forward + backward = 3 x forward, for the global batch of one optimiser step (all micro-batches)."""
  return 3 * forward_flops(cfg, batch_size=batch_size, seq_len=seq_len, max_images=max_images,
                           tile_size=tile_size, causal_attention=causal_attention)


def attention_core_forward_flops(cfg: ModelConfig, *, batch_size: int, seq_len: int, max_images: int,
                                 tile_size: int) -> int:
  """The part of `forward_flops` that attention kernels compute (scores and weighted values, ViT and decoder)."""
  return (batch_size * max_images * vit_attention_core_flops_per_tile(cfg.vision, tile_size)
          + batch_size * decoder_attention_core_flops(cfg.decoder, seq_len=seq_len))


def peak_tflops_per_device(device_kind: str, override: float | None = None) -> float | None:
  """Peak TFLOP/s of one device: `override`, else env MM15_PEAK_TFLOPS, else the table by device kind (longest
  matching prefix); None when unknown (CPU): MFU is then not reported."""
  if override:
    return float(override)
  env = os.environ.get("MM15_PEAK_TFLOPS", "")
  if env:
    try:
      return float(env)
    except ValueError as e:
      raise ValueError(f"MM15_PEAK_TFLOPS={env!r} is not a number (TFLOP/s per device)") from e
  matches = [k for k in PEAK_TFLOPS_BY_KIND if device_kind.lower().startswith(k.lower())]
  return PEAK_TFLOPS_BY_KIND[max(matches, key=len)] if matches else None


def utilisation(flops_per_step: float, steps_per_s: float, num_devices: int, peak_tflops: float | None
                ) -> dict[str, float]:
  """{"tflops_per_device", "mfu" (only with a known peak)} achieved at `steps_per_s`."""
  tflops = flops_per_step * steps_per_s / num_devices / 1e12
  out = {"tflops_per_device": tflops}
  if peak_tflops:
    out["mfu"] = tflops / peak_tflops
  return out
