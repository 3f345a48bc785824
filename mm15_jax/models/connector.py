"""C-Abstractor (Honeybee): RegStage -> adaptive average pool -> RegStage -> MLP readout.

Input: ViT patch tokens (class token dropped) plus a learned position embedding. A RegStage is `depth` timm RegNet
Bottleneck blocks (bottle_ratio 1, group size 1 so the 3x3 conv is depthwise, SiLU, LayerNorm2d with eps 1e-6):
  1x1 conv, LN, SiLU; 3x3 depthwise conv, LN, SiLU; squeeze-excite (reduce to round(in_chs * se_ratio) channels,
  SiLU, expand, sigmoid gate); 1x1 conv, LN; + shortcut (identity, or 1x1 conv + LN when widths differ); SiLU.
Convolutions have no bias except the squeeze-excite ones (as timm). Layout NHWC.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mm15_jax.config import ConnectorConfig
from mm15_jax.kernels.conv import depthwise_conv3x3, depthwise_conv3x3_native  # noqa: F401
from mm15_jax.models import layers
from mm15_jax.sharding import constrain

LN2D_EPS = 1e-6  # timm LayerNorm2d default


class ConvNorm(nnx.Module):
  """1x1 conv (no bias) + LayerNorm2d."""

  def __init__(self, in_ch: int, out_ch: int, *, dtype, param_dtype, rngs):
    self.kernel = layers.param(rngs, layers.fan_in_init(in_ch), (in_ch, out_ch), ("conv_in", "conv_out"), param_dtype)
    self.norm = layers.LayerNorm(out_ch, "conv_out", eps=LN2D_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, x_BHWC):
    return self.norm(layers.project(x_BHWC, self.kernel[...].astype(self.dtype)))


class Bottleneck(nnx.Module):

  def __init__(self, in_ch: int, out_ch: int, se_ratio: float, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = ConvNorm(in_ch, out_ch, **kw)
    self.dw_kernel = layers.param(rngs, layers.fan_in_init(9), (3, 3, 1, out_ch), (None, None, None, "conv_out"),
                                  param_dtype)
    self.dw_norm = layers.LayerNorm(out_ch, "conv_out", eps=LN2D_EPS, **kw)
    se_ch = int(round(in_ch * se_ratio))
    self.use_se = se_ch > 0
    if self.use_se:
      self.se_reduce = layers.Linear(out_ch, se_ch, ("conv_out", None), use_bias=True, **kw)
      self.se_expand = layers.Linear(se_ch, out_ch, (None, "conv_out"), use_bias=True, **kw)
    self.conv3 = ConvNorm(out_ch, out_ch, **kw)
    self.shortcut = ConvNorm(in_ch, out_ch, **kw) if in_ch != out_ch else None
    self.dtype = dtype

  def __call__(self, x_BHWC):
    h = jax.nn.silu(self.conv1(x_BHWC))
    h = depthwise_conv3x3(h, self.dw_kernel[...].astype(self.dtype))
    h = jax.nn.silu(self.dw_norm(h))
    if self.use_se:
      s = h.astype(jnp.float32).mean((1, 2), keepdims=True).astype(self.dtype)
      h = h * jax.nn.sigmoid(self.se_expand(jax.nn.silu(self.se_reduce(s))))
    h = self.conv3(h)
    short = x_BHWC if self.shortcut is None else self.shortcut(x_BHWC)
    return jax.nn.silu(h + short.astype(h.dtype))


class RegStage(nnx.Module):

  def __init__(self, depth: int, in_ch: int, out_ch: int, se_ratio: float, *, dtype, param_dtype, rngs):
    self.blocks = nnx.List([
        Bottleneck(in_ch if i == 0 else out_ch, out_ch, se_ratio, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for i in range(depth)])

  def __call__(self, x_BHWC):
    for block in self.blocks:
      x_BHWC = constrain(block(x_BHWC), ("batch", None, None, "conv_out"))
    return x_BHWC


def adaptive_avg_pool(x_BHWC, out_side: int):
  """PyTorch AdaptiveAvgPool2d((out_side, out_side)): windows [floor(i*in/out), ceil((i+1)*in/out))."""
  _, h, w, _ = x_BHWC.shape
  mh = jnp.asarray(layers.adaptive_avg_pool_matrix(h, out_side), jnp.float32)
  mw = jnp.asarray(layers.adaptive_avg_pool_matrix(w, out_side), jnp.float32)
  y = jnp.einsum("oh,bhwc->bowc", mh, x_BHWC.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  y = jnp.einsum("pw,bowc->bopc", mw, y, precision=jax.lax.Precision.HIGHEST)
  return y.astype(x_BHWC.dtype)


class CAbstractor(nnx.Module):
  """patch tokens [B, side*side, vit_width] -> [B, pooled_side**2, d_model]."""

  def __init__(self, cfg: ConnectorConfig, *, in_dim: int, out_dim: int, grid_side: int, dtype="bfloat16",
               param_dtype="float32", rngs: nnx.Rngs):
    self.pooled_side = cfg.pooled_side
    self.center_tokens = cfg.center_tokens
    self.dtype = layers.dtype_of(dtype)
    pdt = layers.dtype_of(param_dtype)
    kw = dict(dtype=self.dtype, param_dtype=pdt, rngs=rngs)
    self.pos_embedding = layers.param(rngs, layers.normal_init(0.02), (grid_side * grid_side, in_dim),
                                      ("tokens", "vit_embed"), pdt)
    self.stage1 = RegStage(cfg.depth, in_dim, cfg.hidden, cfg.se_ratio, **kw)
    self.stage2 = RegStage(cfg.depth, cfg.hidden, cfg.hidden, cfg.se_ratio, **kw)
    self.readout1 = layers.Linear(cfg.hidden, out_dim, ("conv_in", "mlp"), use_bias=True, **kw)
    self.readout2 = layers.Linear(out_dim, out_dim, ("mlp", "embed"), use_bias=True, **kw)

  @property
  def tokens_per_image(self) -> int:
    return self.pooled_side ** 2

  def __call__(self, x_BLD):
    b, n, d = x_BLD.shape
    side = int(round(n ** 0.5))
    if side * side != n:
      raise ValueError(f"connector input has {n} tokens, not a square grid")
    pos = self.pos_embedding[...]
    if pos.shape[0] != n:  # resolution differs from the stored grid: resize like the ViT's
      stored = int(round(pos.shape[0] ** 0.5))
      pos = layers.resize_grid_bicubic(pos.reshape(stored, stored, d), side, side).reshape(n, d)
    x = (x_BLD.astype(self.dtype) + pos.astype(self.dtype)).reshape(b, side, side, d)
    x = self.stage1(x)
    x = adaptive_avg_pool(x, self.pooled_side)
    x = self.stage2(x)
    x = x.reshape(b, self.pooled_side ** 2, -1)
    x = self.readout2(jax.nn.silu(self.readout1(x)))
    if self.center_tokens:
      x = x - x.mean(axis=1, keepdims=True)
    return constrain(x, ("batch", "length", "embed"))
