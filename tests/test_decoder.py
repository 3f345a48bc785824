import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fixtures import dot_operand_types, mesh_of
from mm15_jax import sharding
from mm15_jax.config import DecoderConfig, MeshConfig, MoEConfig
from mm15_jax.kernels import attention as attention_lib
from mm15_jax.models import decoder as dec


def cfg_of(moe=True, **kw):
  base = DecoderConfig(vocab_size=256, d_model=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_dim=128,
                       moe=MoEConfig(num_experts=4, top_k=2, every=2) if moe else None)
  return dataclasses.replace(base, **kw)


def build(cfg, **kw):
  kw.setdefault("dtype", "float32")
  return dec.Decoder(cfg, rngs=nnx.Rngs(0), **kw)


def forward(model, tokens, segment_ids, positions):
  logits, aux, _ = model(model.embed(tokens), segment_ids, positions)
  return logits, aux


@jax.jit
def _jitted_forward(graphdef, state, tokens, segment_ids, positions):
  return forward(nnx.merge(graphdef, state), tokens, segment_ids, positions)


def run(model, tokens, segment_ids=None, positions=None):
  b, t = tokens.shape
  segment_ids = np.ones((b, t), np.int32) if segment_ids is None else segment_ids
  positions = np.tile(np.arange(t, dtype=np.int32), (b, 1)) if positions is None else positions
  graphdef, state = nnx.split(model)
  return _jitted_forward(graphdef, state, tokens, segment_ids, positions)


TOKENS = np.asarray(jax.random.randint(jax.random.key(1), (2, 12), 0, 256), np.int32)


@pytest.mark.parametrize("moe", [False, True])
def test_shapes_and_scan_equals_unrolled(moe):
  cfg = cfg_of(moe)
  logits_s, aux_s = run(build(cfg, scan_layers=True), TOKENS)
  logits_u, aux_u = run(build(cfg, scan_layers=False), TOKENS)
  assert logits_s.shape == (2, 12, 256) and logits_s.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits_s), np.asarray(logits_u), atol=1e-5)
  for k in dec.AUX_KEYS:
    np.testing.assert_allclose(float(aux_s[k]), float(aux_u[k]), rtol=1e-5)
  if moe:
    assert float(aux_s["moe_load_balance_loss"]) >= 1.0 - 1e-6  # E * sum f P >= 1 (Cauchy-Schwarz-like bound)
  else:
    assert all(float(v) == 0.0 for v in aux_s.values())


def test_remat_keeps_gradients():
  cfg = cfg_of(True, num_layers=2)

  def grads(model):
    graphdef, params = nnx.split(model)

    def loss(p):
      seg, pos = jnp.ones_like(TOKENS), jnp.tile(jnp.arange(TOKENS.shape[1]), (TOKENS.shape[0], 1))
      return forward(nnx.merge(graphdef, p), TOKENS, seg, pos)[0].std()

    return jax.jit(jax.grad(loss))(params)

  g0 = grads(build(cfg, remat="none"))
  for remat in ("full", "dots"):
    g1 = grads(build(cfg, remat=remat))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("moe", [False, True])
def test_packed_segments_equal_separate_runs(moe):
  model = build(cfg_of(moe, rope_theta=500.0))
  a, b = TOKENS[0, :5], TOKENS[1, :4]
  packed = np.concatenate([a, b, [0, 0, 0]])[None].astype(np.int32)
  seg = np.array([[1] * 5 + [2] * 4 + [0] * 3], np.int32)
  pos = np.array([list(range(5)) + list(range(4)) + [0, 0, 0]], np.int32)
  logits, _ = run(model, packed, seg, pos)
  alone_a, _ = run(model, a[None])
  alone_b, _ = run(model, b[None])
  np.testing.assert_allclose(np.asarray(logits[0, :5]), np.asarray(alone_a[0]), atol=2e-5)
  np.testing.assert_allclose(np.asarray(logits[0, 5:9]), np.asarray(alone_b[0]), atol=2e-5)
  assert np.isfinite(np.asarray(logits)).all()


def test_causality():
  model = build(cfg_of(False))
  logits, _ = run(model, TOKENS)
  changed = TOKENS.copy()
  changed[:, 7:] = (changed[:, 7:] + 1) % 256
  logits2, _ = run(model, changed)
  np.testing.assert_allclose(np.asarray(logits[:, :7]), np.asarray(logits2[:, :7]), atol=1e-6)
  assert np.abs(np.asarray(logits[:, 7:] - logits2[:, 7:])).max() > 1e-3


def test_rope_is_rotation_by_position():
  x = jax.random.normal(jax.random.key(2), (1, 3, 2, 8))
  pos = jnp.array([[0, 5, 11]])
  y = np.asarray(dec.rope(x, pos, theta=100.0))
  # Independent form: pairs (i, i + half) as complex numbers times exp(i * pos * theta^(-2i/d)).
  xc = np.asarray(x[..., :4]) + 1j * np.asarray(x[..., 4:])
  ang = np.asarray(pos)[..., None, None] * 100.0 ** (-np.arange(4) * 2 / 8)
  ref = xc * np.exp(1j * ang)
  np.testing.assert_allclose(y, np.concatenate([ref.real, ref.imag], -1), atol=1e-5)


def test_grouped_query_attention_equals_repeated_kv():
  q = jax.random.normal(jax.random.key(3), (1, 5, 4, 8))
  k = jax.random.normal(jax.random.key(4), (1, 5, 2, 8))
  v = jax.random.normal(jax.random.key(5), (1, 5, 2, 8))
  mask = dec.segment_causal_mask(jnp.ones((1, 5), jnp.int32))
  out = dec.attend(q, k, v, mask, jnp.float32)
  full = dec.attend(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), mask, jnp.float32)
  np.testing.assert_allclose(np.asarray(out), np.asarray(full), atol=1e-6)


def test_tied_embeddings_and_qkv_bias_variants():
  model = build(cfg_of(False, tie_embeddings=True, qkv_bias=True))
  assert model.lm_head is None
  logits, _ = run(model, TOKENS)
  x = model.final_norm(jnp.zeros((1, 1, 64)) + 1.0)
  np.testing.assert_allclose(np.asarray(model.logits(x))[0, 0], np.asarray(x[0, 0] @ model.embedding[...].T),
                             rtol=1e-5, atol=1e-5)
  names = nnx.get_partition_spec(nnx.state(model))
  assert tuple(names["units"]["blocks"][0]["attn"]["q_bias"].get_value()) == ("layers", "heads", "head_dim")


def test_every_param_has_logical_names():
  model = build(cfg_of(True))
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  params = nnx.state(model, nnx.Param)
  for (path, spec), leaf in zip(jax.tree_util.tree_leaves_with_path(specs), jax.tree.leaves(params)):
    names = tuple(spec)
    assert len(names) == leaf.ndim, path
    assert any(n is not None for n in names), path


def test_bad_config_raises():
  with pytest.raises(ValueError, match="num_layers"):
    build(cfg_of(True, num_layers=3))
  with pytest.raises(ValueError, match="num_kv_heads"):
    build(cfg_of(False, num_kv_heads=3))


def test_upcycled_decoder_matches_dense():
  dense = build(cfg_of(False))
  moe = build(cfg_of(True))
  dec.upcycle_from_dense(dense, moe)
  want, _ = run(dense, TOKENS)
  got, aux = run(moe, TOKENS)  # experts identical and weights renormalised to 1: the same function
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  assert float(aux["moe_load_balance_loss"]) > 0
  with pytest.raises(ValueError, match="dense source"):
    dec.upcycle_from_dense(moe, dense)


# Blocked causal attention


def packed_segments(lengths, total):
  ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(total - sum(lengths))])
  return jnp.asarray(ids, jnp.int32)


def test_blocked_attention_matches_dense():
  t, block = 45, 16  # query blocks of 16, 16 and 13 tokens
  b, h, g, hd = 2, 4, 2, 8
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, h, hd))
  k = jax.random.normal(keys[1], (b, t, g, hd))
  v = jax.random.normal(keys[2], (b, t, g, hd))
  weights = jax.random.normal(keys[3], (b, t, h, hd))
  # Row 0: three packed segments and padding; row 1: one segment over the whole row.
  seg = jnp.stack([packed_segments([t // 3, t // 4, t // 5], t), jnp.ones((t,), jnp.int32)])
  mask = dec.segment_causal_mask(seg)

  def loss(impl, q, k, v):
    out = dec.attend(q, k, v, mask, jnp.float32, causal=True, impl=impl, block=block)
    return (out * weights).sum(), out

  grads, outs = {}, {}
  for impl in ("dense", "blocked"):
    (_, outs[impl]), grads[impl] = jax.jit(jax.value_and_grad(lambda *a, i=impl: loss(i, *a), argnums=(0, 1, 2),
                                                              has_aux=True))(q, k, v)
  np.testing.assert_allclose(np.asarray(outs["blocked"]), np.asarray(outs["dense"]), atol=1e-5)
  for name, got, want in zip("qkv", grads["blocked"], grads["dense"]):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, err_msg=f"d{name}")
  assert np.isfinite(np.asarray(outs["blocked"])).all()
  # The blocked program never forms a [t, t] float array: the skipped key blocks are really not computed.
  jaxpr = jax.make_jaxpr(lambda *a: loss("blocked", *a)[0])(q, k, v).jaxpr
  shapes = {tuple(var.aval.shape[-2:]) for eqn in jaxpr.eqns for var in eqn.outvars
            if var.aval.dtype == jnp.float32 and len(var.aval.shape) >= 2}
  assert (t, t) not in shapes


def test_blocked_attention_bfloat16_runs_bfloat16_products():
  """bfloat16 q, k, v: the blocked attention's score, value and query-gradient products are bfloat16 GEMMs
  accumulating in float32 on CPU (a bfloat16-result dot is upcast to a float32 GEMM there), with dense float32
  attention's values on the same inputs to bfloat16 accuracy."""
  t, block, b, h, g, hd = 45, 16, 2, 4, 2, 8
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, (b, t, n, hd)).astype(jnp.bfloat16) for key, n in zip(keys, (h, g, g)))
  weights = jax.random.normal(keys[3], (b, t, h, hd))
  mask = dec.segment_causal_mask(jnp.ones((b, t), jnp.int32))

  def loss(impl, dtype, *qkv):
    out = dec.attend(*qkv, mask, dtype, causal=True, impl=impl, block=block)
    return (out.astype(jnp.float32) * weights).sum()

  grad = lambda impl, dtype: jax.jit(jax.grad(lambda *a: loss(impl, dtype, *a), argnums=(0, 1, 2)))
  got = grad("blocked", jnp.bfloat16)(q, k, v)
  want = grad("dense", jnp.float32)(*(x.astype(jnp.float32) for x in (q, k, v)))
  for name, a, w in zip("qkv", got, want):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(w), atol=0.1, rtol=0.05, err_msg=f"d{name}")
  hlo = grad("blocked", jnp.bfloat16).lower(q, k, v).compile().as_text()
  n_blocks = -(-t // block)
  # per block: scores and values forward, weight gradient and dq backward (dk and dv contract the query axis: XLA:CPU
  # has no bfloat16 kernel for that form, they stay float32)
  assert dot_operand_types(hlo).count(("bf16", "bf16")) == 4 * n_blocks


def test_decoder_blocked_matches_dense():
  """A packed row longer than CAUSAL_BLOCK through the whole decoder: logits and parameter gradients."""
  t = dec.CAUSAL_BLOCK + 72  # blocks of 128 and 72 tokens
  cfg = DecoderConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, ffn_dim=64, max_len=t)
  tokens = jax.random.randint(jax.random.key(1), (2, t), 0, 64)
  lengths = (90, 70, 30)  # the second segment straddles the block boundary; 10 padding tokens
  seg = jnp.stack([packed_segments(lengths, t), packed_segments([t], t)])
  pos = jnp.stack([jnp.concatenate([jnp.arange(n) for n in lengths] + [jnp.zeros(t - sum(lengths), int)]),
                   jnp.arange(t)]).astype(jnp.int32)

  def loss(m):
    logits, _, _ = m(m.embed(tokens), seg, pos)
    return (logits * jnp.sin(jnp.arange(64.0))).mean(), logits

  results = {}
  for impl in ("dense", "blocked"):
    model = dec.Decoder(cfg, dtype="float32", attention=impl, rngs=nnx.Rngs(0))  # the same parameters
    results[impl] = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
  (_, got), got_grads = results["blocked"]
  (_, want), want_grads = results["dense"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=1e-4, err_msg=str(path))


def test_attention_impl_selection():
  assert attention_lib.resolve("auto", "cpu") == "blocked"
  assert attention_lib.resolve("auto", "tpu") == "splash"
  assert attention_lib.resolve("auto", "gpu") == "cudnn"
  assert attention_lib.resolve("dense", "cpu") == "dense"
  assert attention_lib.resolve("blocked", "tpu") == "blocked"
  assert attention_lib.resolve("auto") == "blocked"  # the default backend here is CPU
  with sharding.use_mesh(mesh_of(MeshConfig(data=-1))):  # the mesh's devices decide (CPU ones here)
    assert attention_lib.resolve("auto") == "blocked"
  with pytest.raises(ValueError, match="model.attention='flash'"):
    dec.Decoder(DecoderConfig(vocab_size=8, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1, ffn_dim=8),
                attention="flash", rngs=nnx.Rngs(0))
