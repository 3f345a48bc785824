"""Grouped matmul: the blocked CPU kernel equals ragged_dot and a per-row reference, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm15_jax.kernels.grouped import grouped_matmul, resolve_impl


def _reference(x, w, sizes):
  group = np.repeat(np.arange(len(sizes)), sizes)
  return np.einsum("ad,adf->af", x, w[group])


@pytest.mark.parametrize("sizes", [[5, 0, 9, 1], [0, 0, 15, 0], [4, 4, 4, 3]])
@pytest.mark.parametrize("block", [1, 4, 8])
def test_blocked_matches_reference(sizes, block):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(sum(sizes), 6)).astype(np.float32)
  w = rng.normal(size=(len(sizes), 6, 3)).astype(np.float32)
  got = grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes, jnp.int32), impl="blocked", block=block)
  np.testing.assert_allclose(got, _reference(x, w, sizes), rtol=1e-5, atol=1e-5)


def test_blocked_gradients_match_ragged():
  rng = np.random.default_rng(1)
  sizes = jnp.asarray([7, 0, 3, 10], jnp.int32)
  x = jnp.asarray(rng.normal(size=(20, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 5, 6)), jnp.float32)
  grads = {impl: jax.grad(lambda x, w: jnp.sum(jnp.sin(grouped_matmul(x, w, sizes, impl=impl, block=4))),
                          argnums=(0, 1))(x, w) for impl in ("ragged", "blocked")}
  for a, b in zip(grads["ragged"], grads["blocked"]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_resolve_impl():
  assert resolve_impl("auto") == ("blocked" if jax.default_backend() == "cpu" else "ragged")  # no mesh active
  with pytest.raises(ValueError, match="grouped_matmul"):
    resolve_impl("dense")
