"""layers.project: the same values and gradients whichever way it contracts; on CPU no transposed copies."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fixtures import dot_operand_types
from mm15_jax.models import layers


@pytest.mark.parametrize("x_shape, w_shape, n_contract", [
    ((2, 5, 8), (8, 6), 1),            # [B, T, D] @ [D, F]
    ((2, 5, 8), (8, 3, 4), 1),         # [B, T, D] @ [D, heads, head_dim]
    ((2, 5, 3, 4), (3, 4, 8), 2),      # [B, T, heads, head_dim] @ [heads, head_dim, D]
    ((2, 3, 3, 8), (8, 6), 1),         # [B, H, W, C] @ [C, D]
])
@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_project_matches_einsum(x_shape, w_shape, n_contract, platform, monkeypatch):
  monkeypatch.setattr(layers, "mesh_platform", lambda: platform)  # "tpu": the tensordot path, traced here on CPU
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  letters = "abcdefgh"
  xs, ws = letters[:len(x_shape)], letters[len(x_shape) - n_contract:len(x_shape) - n_contract + len(w_shape)]
  spec = f"{xs},{ws}->{xs[:-n_contract]}{ws[n_contract:]}"
  reference = lambda x, w: (jnp.einsum(spec, x, w, precision="highest") ** 2).sum()
  ours = lambda x, w: (layers.project(x, w, n_contract, precision="highest") ** 2).sum()
  np.testing.assert_allclose(layers.project(x, w, n_contract, precision="highest"),
                             jnp.einsum(spec, x, w, precision="highest"), rtol=1e-6, atol=1e-6)
  for got, want in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(reference, (0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  out = layers.project(x, w, n_contract, preferred_element_type=jnp.float32)
  assert out.shape == x_shape[:-n_contract] + w_shape[n_contract:] and out.dtype == jnp.float32


def test_cpu_ffn_gradient_has_no_transposed_copies():
  """The reason for the CPU path: a [B, T, D] SwiGLU's weight gradients contract over B and T; written as 3-D
  einsums XLA:CPU transposes the [B, T, F] operands first (kept here as the control), merged it does not."""
  graphdef, params = nnx.split(layers.SwiGLU(16, 48, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
  x = jnp.ones((2, 32, 16))

  def loss_einsum(p, x):
    h = jax.nn.silu(jnp.einsum("btd,df->btf", x, p["gate"][...])) * jnp.einsum("btd,df->btf", x, p["up"][...])
    return (jnp.einsum("btf,fd->btd", h, p["down"][...]) ** 2).sum()

  loss_ours = lambda p, x: (nnx.merge(graphdef, p)(x) ** 2).sum()
  transposes = lambda f: jax.jit(jax.grad(f)).lower(params, x).compile().as_text().count(" transpose(")
  assert transposes(loss_einsum) > 0
  assert transposes(loss_ours) == 0
  got, want = jax.grad(loss_ours)(params, x), jax.grad(loss_einsum)(params, x)
  for name in ("gate", "up", "down"):
    np.testing.assert_allclose(got[name][...], want[name][...], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_dtype", [None, jnp.float32])
def test_cpu_bfloat16_projection_accumulates_in_float32(out_dtype):
  """bfloat16 operands on CPU: forward and both gradients are bfloat16 GEMMs accumulating in float32 (XLA:CPU
  would upcast a bfloat16-result dot to a float32 GEMM), with the values of float32 arithmetic on the same inputs."""
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (2, 64, 96)).astype(jnp.bfloat16)
  w = jax.random.normal(kw, (96, 80)).astype(jnp.bfloat16)
  cotangent = jax.random.normal(kg, (2, 64, 80)).astype(jnp.bfloat16)
  kwargs = {} if out_dtype is None else {"preferred_element_type": out_dtype}
  ours = lambda x, w: layers.project(x, w, **kwargs)
  y, vjp = jax.vjp(ours, x, w)
  dx, dw = vjp(cotangent.astype(y.dtype))
  assert y.dtype == (out_dtype or jnp.bfloat16) and dx.dtype == dw.dtype == jnp.bfloat16
  f32 = lambda a: np.asarray(a, np.float32)
  want_y = np.einsum("btd,df->btf", f32(x), f32(w))
  want_dx = np.einsum("btf,df->btd", f32(cotangent), f32(w))
  want_dw = np.einsum("btd,btf->df", f32(x), f32(cotangent))
  for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
    # Products of bfloat16 values are exact in float32; the one rounding to bfloat16 is at most half an ulp (2^-9).
    np.testing.assert_allclose(f32(got), want, rtol=2 ** -8, atol=1e-3 * np.abs(want).max())
  hlo = jax.jit(lambda x, w, g: jax.vjp(ours, x, w)[1](g)).lower(x, w, cotangent.astype(y.dtype)).compile().as_text()
  assert dot_operand_types(hlo) == [("bf16", "bf16")] * 2
  forward = jax.jit(ours).lower(x, w).compile().as_text()
  assert dot_operand_types(forward) == [("bf16", "bf16")]


def test_unrolled_stack_gradient_equals_scan_and_is_stacked_once():
  """run_stack(scan=False): the same values and parameter gradients as the scan; each layer's gradient reaches the
  stacked parameter through one stack, not as a zero-padded full-size array per layer summed (a slice's gradient)."""
  stack = layers.stacked(3, lambda r: layers.SwiGLU(8, 16, dtype=jnp.float32, param_dtype=jnp.float32, rngs=r),
                         nnx.Rngs(0))
  graphdef, params = nnx.split(stack)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8))

  def loss(p, scan):
    body = lambda layer, h, _: (h + layer(h), None)
    out, _ = layers.run_stack(nnx.merge(graphdef, p), body, x, length=3, scan=scan, remat="none")
    return (out ** 2).sum()

  np.testing.assert_allclose(loss(params, False), loss(params, True), rtol=1e-6)
  got, want = jax.grad(loss)(params, False), jax.grad(loss)(params, True)
  for name in ("gate", "up", "down"):
    # Float32 rounding of sums in another order: an entry's error scales with the array's largest entries (here
    # hundreds; an ulp there is ~1e-5), not with the entry itself, which can be small by cancellation.
    scale = np.abs(want[name][...]).max()
    np.testing.assert_allclose(got[name][...], want[name][...], rtol=1e-5, atol=1e-6 * scale)
  hlo = jax.jit(jax.grad(loss), static_argnums=1).lower(params, False).compile().as_text()
  assert " pad(" not in hlo
