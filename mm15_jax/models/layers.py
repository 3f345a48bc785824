"""Small shared pieces: parameters with logical axis names, Linear, norms, layer stacks, bicubic resize.

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds logical axis names (see
mm15_jax.sharding.LOGICAL_RULES); `nnx.get_partition_spec(nnx.state(model))` returns those names. Sharding is applied
by whoever places the state on a mesh (jit out_shardings), so eager sharding is off.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm15_jax.sharding import constrain, current_mesh

Initializer = Callable[..., jax.Array]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def mesh_platform() -> str:
  """Platform of the active mesh's devices ("tpu" for an ahead-of-time TPU compile on a CPU host), else jax's
  default backend: what implementation choices made at trace time ask."""
  mesh = current_mesh()
  return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def project(x, w, n_contract: int = 1, **dot_kwargs):
  """x [..., *in] @ w [*in, *out] -> [..., *out]: the last `n_contract` axes of x against the first of w.

  On CPU, x's leading axes are merged into one first: XLA:CPU lowers a weight gradient that contracts over several
  axes (batch and length) with a transposed copy of the activation gradient; merged, a 4-layer SwiGLU stack's
  forward + backward took 0.58x the time (BENCHMARKS.md section 1). Low-precision (bfloat16) operands on CPU also
  accumulate in float32 in the forward and both gradients (`_matmul_f32_accumulate`). Other platforms get the plain
  tensordot.
  """
  if mesh_platform() != "cpu":
    return jnp.tensordot(x, w, axes=n_contract, **dot_kwargs)
  lead, inner = x.shape[:x.ndim - n_contract], int(np.prod(x.shape[x.ndim - n_contract:]))
  x_MK, w_KN = x.reshape(-1, inner), w.reshape(inner, -1)
  if x.dtype == w.dtype and jnp.finfo(x.dtype).bits < 32:
    out = dot_kwargs.pop("preferred_element_type", x.dtype)
    if dot_kwargs:
      raise ValueError(f"project: unsupported arguments {sorted(dot_kwargs)} for {x.dtype} operands on CPU")
    y = _matmul_f32_accumulate(x_MK, w_KN, jnp.dtype(out))
  else:
    y = jnp.matmul(x_MK, w_KN, **dot_kwargs)
  return y.reshape(*lead, *w.shape[n_contract:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_f32_accumulate(x_MK, w_KN, out_dtype):
  """x_MK @ w_KN for low-precision operands on CPU, accumulated in float32, returned as out_dtype.

  A bfloat16 dot whose result is bfloat16 is upcast to float32 by XLA:CPU (operands converted, float32 GEMM); one
  that accumulates in float32 runs bfloat16 kernels (AMX/AVX512-BF16 where present, ~4x the float32 rate measured
  on a Sapphire Rapids host). The custom gradient keeps both backward products in that form too.
  """
  return _dot_f32(x_MK, w_KN).astype(out_dtype)


def _dot_f32(a_MK, b_KN):
  return jnp.matmul(a_MK, b_KN, preferred_element_type=jnp.float32)


def _dot_nt_f32(a_MK, b_NK):
  """a_MK @ b_NK.T accumulated in float32: both operands contract their last axis, a form XLA:CPU keeps in bf16."""
  return jax.lax.dot_general(a_MK, b_NK, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _transposed(a_MK):
  """a_MK.T laid out row-major in memory. A transpose feeding a dot is otherwise folded into it, and a dot that
  contracts its operands' first axis (the weight gradient's form) is one XLA:CPU upcasts to a float32 GEMM; the
  copy costs O(M * K) against the GEMM's O(M * K * N)."""
  return jax.lax.optimization_barrier(a_MK.T.reshape(-1)).reshape(a_MK.shape[::-1])


def _matmul_f32_accumulate_fwd(x_MK, w_KN, out_dtype):
  return _matmul_f32_accumulate(x_MK, w_KN, out_dtype), (x_MK, w_KN)


def _matmul_f32_accumulate_bwd(out_dtype, residuals, dy_MN):
  del out_dtype
  x_MK, w_KN = residuals
  dy_MN = dy_MN.astype(x_MK.dtype)
  dx_MK = _dot_nt_f32(dy_MN, w_KN)
  dw_KN = _dot_nt_f32(_transposed(x_MK), _transposed(dy_MN))
  return dx_MK.astype(x_MK.dtype), dw_KN.astype(w_KN.dtype)


_matmul_f32_accumulate.defvjp(_matmul_f32_accumulate_fwd, _matmul_f32_accumulate_bwd)


def dtype_of(name: str):
  if name not in DTYPES:
    raise ValueError(f"model dtype {name!r} is not one of {sorted(DTYPES)} (config key model.dtype/param_dtype)")
  return DTYPES[name]


def param(rngs: nnx.Rngs | None, init: Initializer, shape: Sequence[int], names: Sequence[str | None],
          param_dtype=jnp.float32) -> nnx.Param:
  if len(names) != len(shape):
    raise ValueError(f"parameter of shape {tuple(shape)} got {len(names)} logical names {tuple(names)}")
  key = rngs.params() if rngs is not None else None
  value = init(key, tuple(shape), param_dtype)
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def zeros_init(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def ones_init(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def normal_init(stddev: float) -> Initializer:
  return jax.nn.initializers.normal(stddev)


def fan_in_init(fan_in: int) -> Initializer:
  """Normal with std 1/sqrt(fan_in) (LeCun), fan_in given explicitly so multi-axis kernels are scaled right."""
  return jax.nn.initializers.normal(1.0 / np.sqrt(max(fan_in, 1)))


class Linear(nnx.Module):
  """y = x @ kernel + bias over the last axis; kernel [in, out]."""

  def __init__(self, in_dim: int, out_dim: int, names: tuple[str | None, str | None], *, use_bias: bool,
               dtype, param_dtype, rngs: nnx.Rngs):
    self.kernel = param(rngs, fan_in_init(in_dim), (in_dim, out_dim), names, param_dtype)
    self.bias = param(rngs, zeros_init, (out_dim,), names[1:], param_dtype) if use_bias else None
    self.dtype = dtype

  def __call__(self, x):
    y = project(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32."""

  def __init__(self, dim: int, name: str | None, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
    self.scale = param(rngs, ones_init, (dim,), (name,), param_dtype)
    self.bias = param(rngs, zeros_init, (dim,), (name,), param_dtype)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class RMSNorm(nnx.Module):
  """Llama RMSNorm: normalise in float32, cast to the compute dtype, then scale (as HF LlamaRMSNorm)."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
    self.scale = param(rngs, ones_init, (dim,), ("embed",), param_dtype)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


def activation(name: str):
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":  # exact erf GELU, as torch's nn.GELU() / HF "gelu"
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "silu":
    return jax.nn.silu
  raise ValueError(f"unknown activation {name!r} (config key model.vision.act)")


# ------------------------------------------------------------------------------------------------------------------
# Layer stacks: parameters of `num` identical modules stacked on a leading "layers" axis. The same stacked state runs
# under jax.lax.scan (compile time independent of depth) or an unrolled Python loop (identical numerics), so a
# checkpoint does not depend on `scan_layers`.


def stacked(num: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
  """`num` modules built by `make`, their parameters stacked on a leading axis named "layers"."""

  @nnx.split_rngs(splits=num)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def build(r):
    return make(r)

  return build(rngs)


REMAT_POLICIES = ("none", "full", "dots")


def maybe_remat(fn, remat: str):
  if remat == "none":
    return fn
  if remat == "full":
    return jax.checkpoint(fn)
  if remat == "dots":
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  raise ValueError(f"unknown remat {remat!r} (config key model.remat, one of {REMAT_POLICIES})")


def _slices(a_L) -> tuple:
  return tuple(a_L[i] for i in range(a_L.shape[0]))


@jax.custom_vjp
def unstack(a_L):
  """a_L[0], a_L[1], ...: the layers of a stacked array. Its gradient is one stack of theirs; a slice's gradient would
  be a zero-padded full-size array per layer, summed (XLA:CPU keeps those pads: 7% of a 4-layer train step)."""
  return _slices(a_L)


def _unstack_fwd(a_L):
  return unstack(a_L), None


def _unstack_bwd(_, cotangents):
  return (jnp.stack(cotangents),)


unstack.defvjp(_unstack_fwd, _unstack_bwd)


def _layers_of(a_L) -> tuple:
  return unstack(a_L) if jnp.issubdtype(a_L.dtype, jnp.inexact) else _slices(a_L)  # integers have no gradient


def run_stack(stack: nnx.Module, body, carry, xs=None, *, length: int, scan: bool, remat: str):
  """Applies `body(layer, carry, x) -> (carry, y)` for each of the first `length` stacked layers.

  xs: per-layer inputs with a leading layer axis (or None). Returns (carry, ys stacked on a leading axis).
  """
  graphdef, state = nnx.split(stack)
  if length != jax.tree.leaves(state)[0].shape[0]:
    state = jax.tree.map(lambda a: a[:length], state)

  def step(carry, layer_state_and_x):
    layer_state, x = layer_state_and_x
    return body(nnx.merge(graphdef, layer_state), carry, x)

  step = maybe_remat(step, remat)
  if scan:
    return jax.lax.scan(step, carry, (state, xs))
  leaves, treedef = jax.tree.flatten(state)
  leaf_layers = [_layers_of(a) for a in leaves]  # [leaf][layer]
  ys = []
  for i in range(length):
    layer_state = treedef.unflatten([layers_of_leaf[i] for layers_of_leaf in leaf_layers])
    carry, y = step(carry, (layer_state, jax.tree.map(lambda a: a[i], xs)))
    ys.append(y)
  ys = jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys and ys[0] is not None else None
  return carry, ys


# ------------------------------------------------------------------------------------------------------------------
# Resampling on a patch grid.


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic convolution kernel with PyTorch's a = -0.75."""
  t = np.abs(t)
  near = ((a + 2) * t - (a + 3)) * t * t + 1
  far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] matrix of torch.nn.functional.interpolate(mode="bicubic", align_corners=False, size=out).

  Source coordinate (i + 0.5) * in / out - 0.5 (not clamped for cubic), four taps floor(x) - 1 .. floor(x) + 2
  with indices clamped to the border, as PyTorch's upsample_bicubic2d does.
  """
  m = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for i in range(out_size):
    src = (i + 0.5) * scale - 0.5
    x0 = int(np.floor(src))
    t = src - x0
    weights = _cubic(np.array([t + 1, t, 1 - t, 2 - t]))
    for tap, w in zip(range(x0 - 1, x0 + 3), weights):
      m[i, min(max(tap, 0), in_size - 1)] += w
  return m


def resize_grid_bicubic(grid_HWC: jax.Array, out_h: int, out_w: int) -> jax.Array:
  """Bicubic resize of a [H, W, C] grid (float32 math), separable as PyTorch's is."""
  h, w, _ = grid_HWC.shape
  if (h, w) == (out_h, out_w):
    return grid_HWC
  mh = jnp.asarray(bicubic_matrix(h, out_h), jnp.float32)
  mw = jnp.asarray(bicubic_matrix(w, out_w), jnp.float32)
  g = grid_HWC.astype(jnp.float32)
  out = jnp.einsum("oh,hwc->owc", mh, g, precision=jax.lax.Precision.HIGHEST)
  out = jnp.einsum("pw,owc->opc", mw, out, precision=jax.lax.Precision.HIGHEST)
  return out.astype(grid_HWC.dtype)


def adaptive_avg_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] averaging matrix with PyTorch AdaptiveAvgPool windows: [floor(i*in/out), ceil((i+1)*in/out))."""
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m


class SwiGLU(nnx.Module):
  """Llama FFN: down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, d_model: int, ffn_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.gate = param(rngs, fan_in_init(d_model), (d_model, ffn_dim), ("embed", "mlp"), param_dtype)
    self.up = param(rngs, fan_in_init(d_model), (d_model, ffn_dim), ("embed", "mlp"), param_dtype)
    self.down = param(rngs, fan_in_init(ffn_dim), (ffn_dim, d_model), ("mlp", "embed"), param_dtype)
    self.dtype = dtype

  def __call__(self, x_BTD):
    dt = self.dtype
    x_BTD = x_BTD.astype(dt)
    g_BTF = project(x_BTD, self.gate[...].astype(dt))
    u_BTF = project(x_BTD, self.up[...].astype(dt))
    h_BTF = constrain(jax.nn.silu(g_BTF) * u_BTF, ("batch", "length", "mlp"))
    return project(h_BTF, self.down[...].astype(dt))
