"""3x3 depthwise convolution (the C-Abstractor's RegNet blocks), layout NHWC, kernel HWIO."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mm15_jax.models import layers


def depthwise_conv3x3(x_BHWC, kernel_331C):
  """3x3 depthwise convolution (kernel HWIO, one input channel per group), zero padding 1 (output the input's size).

  On CPU a sum of the nine shifted products, fused into one loop: XLA:CPU's grouped convolution took 8x its time
  forward + backward at the bench connector's [4, 12, 12, 256] (BENCHMARKS.md section 1). Other platforms get the
  native convolution."""
  if layers.mesh_platform() != "cpu":
    return depthwise_conv3x3_native(x_BHWC, kernel_331C)
  _, h, w, _ = x_BHWC.shape
  padded = jnp.pad(x_BHWC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(padded[:, dy:dy + h, dx:dx + w] * kernel_331C[dy, dx, 0] for dy in range(3) for dx in range(3))


def depthwise_conv3x3_native(x_BHWC, kernel_331C):
  return jax.lax.conv_general_dilated(
      x_BHWC, kernel_331C, window_strides=(1, 1), padding=((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x_BHWC.shape[-1])
