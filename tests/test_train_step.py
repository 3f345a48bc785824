"""The train step: loss numerics, masking, per-source sums, accumulation, non-finite steps, frozen parts, schedule,
and a sharded step against a single-device one."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fixtures import FAST_COMPILE, compilation_cache, flat, mesh_of, synthetic_batch, tiny_model  # noqa: F401 (fixture)
from mm15_jax import sharding
from mm15_jax.config import MeshConfig, StageConfig
from mm15_jax.models.multimodal import MultimodalModel
from mm15_jax.train import optim
from mm15_jax.train import state as state_lib
from mm15_jax.train import step as step_lib

IMAGE_TOKEN_ID = 3
NUM_SOURCES = 2
MODEL = tiny_model()
# The steps below weight the MoE auxiliary losses 0: they are per-batch statistics, so accumulating micro-batches
# is exact only for the token-weighted cross-entropy (as in every accumulating trainer). Their weighting is checked
# on `loss_and_metrics` directly. Routing is dropless: a token's output does not depend on the other tokens.
STEP_MODEL = dataclasses.replace(MODEL, decoder=dataclasses.replace(
    MODEL.decoder, moe=dataclasses.replace(MODEL.decoder.moe, load_balance_weight=0.0, z_loss_weight=0.0)))
# The ViT stem is frozen in every step below (one compiled step serves the frozen-parameter test and the others).
FROZEN = ("vision/patch_kernel", "vision/class_embedding", "vision/pos_embedding")
# No warmup: the first update already uses the peak rate (a warmup schedule's step 0 has rate 0 and moves nothing).
STAGE = StageConfig(steps=10, learning_rate=1e-2, warmup_fraction=0.0, clip_norm=1.0,
                    trainable="^(?!(" + "|".join(FROZEN) + ")$)")
# The attention key bias has an exactly zero gradient (softmax ignores a constant shift of every score), so its
# AdaFactor update is normalised rounding noise: it is left out of update comparisons.
ZERO_GRAD = "attn/k_bias"


def log_softmax_np(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 4
  logits[0, 0] += 80.0  # large logits: needs the max-shifted logsumexp
  targets = rng.integers(0, 11, (2, 5)).astype(np.int32)
  expected = -np.take_along_axis(log_softmax_np(logits), targets[..., None], -1)[..., 0]
  got = np.asarray(step_lib.loss_lib.cross_entropy(jnp.asarray(logits), jnp.asarray(targets)))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _loss_case(seed, b=3, t=18, v=13, d=8):
  keys = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(keys[0], (b, t, d))
  w = jax.random.normal(keys[1], (d, v))
  targets = jax.random.randint(keys[2], (b, t), 0, v)
  return x, w, targets, keys[3]


def weighted_ce(*args, **kwargs):
  """The fused loss with the model's LM head, as the train step calls it."""
  return step_lib.loss_lib.weighted_cross_entropy(*args, head=MultimodalModel.head_logits, **kwargs)


def test_weighted_cross_entropy_equals_autodiff_of_the_logits_values_and_gradients():
  x, w, targets, key = _loss_case(0)
  weights = jax.random.uniform(key, targets.shape) * jax.random.bernoulli(key, 0.4, targets.shape)
  weights = weights.at[2].set(0.0)  # a row with no loss at all

  def reference(x, w):
    ce = step_lib.loss_lib.cross_entropy(x @ w, targets)
    return 3.0 * (ce * weights).sum(), jnp.where(weights != 0, ce, 0.0)

  want_loss, want_ce = reference(x, w)
  want_grads = jax.grad(lambda x, w: reference(x, w)[0], (0, 1))(x, w)
  for chunk in (0, 4, 5, 18, 64):  # 18 / 4 leaves a short last chunk; 0, 18 and 64: one chunk
    fused = lambda x, w: weighted_ce(x, w, targets, weights, chunk=chunk)
    loss, ce = fused(x, w)
    np.testing.assert_allclose(3.0 * loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(ce, want_ce, rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.grad(lambda x, w: 3.0 * fused(x, w)[0], (0, 1))(x, w), want_grads):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The per-token CE is a metric: no gradient flows through it.
    assert not np.asarray(jax.grad(lambda w: fused(x, w)[1].sum())(w)).any()


def test_weighted_cross_entropy_keeps_the_compute_dtype():
  x, w, targets, key = _loss_case(2)
  weights = jax.random.bernoulli(key, 0.5, targets.shape).astype(jnp.float32)
  x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  dx, dw = jax.grad(lambda x, w: weighted_ce(x, w, targets, weights, chunk=4)[0],
                    (0, 1))(x16, w16)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  want = jax.grad(lambda x, w: (step_lib.loss_lib.cross_entropy(x @ w, targets) * weights).sum(), (0, 1))(
      x16.astype(jnp.float32), w16.astype(jnp.float32))
  for got, ref in zip((dx, dw), want):
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=0.05, atol=0.05)


def test_weighted_cross_entropy_never_applies_the_head_to_chunks_without_loss():
  """NaN hidden states where the weight is 0: a head applied there would put NaN into the gradients (0 * NaN)."""
  x, w, targets, key = _loss_case(1, b=2, t=16)
  counted = jnp.zeros(targets.shape, bool).at[0, 3:11].set(True).at[1, ::2].set(True)  # 8 each: two full chunks
  weights = counted.astype(jnp.float32)
  nan_x = jnp.where(counted[..., None], x, jnp.nan)
  fused = lambda chunk: lambda x, w: weighted_ce(x, w, targets, weights, chunk=chunk)[0]
  for chunk, finite in ((4, True), (8, True), (16, False)):
    loss = fused(chunk)(nan_x, w)
    dx, dw = jax.grad(fused(chunk), (0, 1))(nan_x, w)
    assert bool(jnp.isfinite(dw).all()) == finite, chunk
  clean = jnp.where(counted[..., None], x, 0.0)
  expected = jax.grad(fused(0), (0, 1))(clean, w)
  np.testing.assert_allclose(loss, fused(0)(clean, w), rtol=1e-6)  # finite: the NaN positions carry no loss
  dx, dw = jax.grad(fused(4), (0, 1))(nan_x, w)
  np.testing.assert_allclose(dw, expected[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dx[counted], expected[0][counted], rtol=1e-5, atol=1e-6)


class Setup:
  """A model state on a mesh and a jitted train step for it (built once per configuration)."""

  def __init__(self, mesh, *, grad_accum=1, seed=0, like=None):
    self.mesh = mesh
    if like is None:
      self.graphdef, params, self.rest = state_lib.init_params(MODEL, mesh, seed)
    else:  # the same parameters, another step
      self.graphdef, params, self.rest = like.graphdef, like.state.params, like.rest
    self.tx = optim.make_optimizer(STAGE, params)
    self.state = state_lib.new_train_state(params, self.tx, mesh)
    step = step_lib.make_train_step(self.graphdef, self.rest, self.tx, model_cfg=STEP_MODEL,
                                    image_token_id=IMAGE_TOKEN_ID, num_sources=NUM_SOURCES, grad_accum=grad_accum)
    shardings = state_lib.state_shardings(self.state)
    self._step = jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None),
                         compiler_options=FAST_COMPILE)

  def step(self, state, batch):
    with sharding.use_mesh(self.mesh):
      return jax.device_get(self._step(state, sharding.global_batch(batch, self.mesh)))


@pytest.fixture(scope="module")
def single():
  return Setup(mesh_of(MeshConfig(data=1), 1))


@pytest.fixture(scope="module")
def batch():
  return synthetic_batch(0, vocab=MODEL.decoder.vocab_size, image_token_id=IMAGE_TOKEN_ID, num_sources=NUM_SOURCES)


def test_loss_masks_and_per_source_sums(single, batch):
  def forward(params, b):
    model = nnx.merge(single.graphdef, params, single.rest)
    logits, _ = model(b.tokens, b.images, b.image_mask, b.segment_ids, b.positions,
                      image_token_id=IMAGE_TOKEN_ID)
    loss, metrics = step_lib.loss_and_metrics(model, b, model_cfg=MODEL, image_token_id=IMAGE_TOKEN_ID,
                                              num_sources=NUM_SOURCES)
    return logits, loss, metrics

  forward = jax.jit(forward, compiler_options=FAST_COMPILE)
  with sharding.use_mesh(single.mesh):
    logits, loss, m = jax.device_get(forward(single.state.params, batch))

  # Reference from the logits: masked mean of -log p(target) and per-source sums, in float64.
  ce_BT = -np.take_along_axis(log_softmax_np(logits), batch.targets[..., None], -1)[..., 0]
  mask = batch.loss_mask.astype(bool)
  assert 0 < mask.sum() < (batch.segment_ids > 0).sum()  # some real tokens are masked
  np.testing.assert_allclose(m["ce"], ce_BT[mask].mean(), rtol=1e-5)
  assert m["loss_tokens"] == mask.sum()
  for s in range(NUM_SOURCES):
    where = mask & (batch.source_ids == s)
    assert where.any()
    np.testing.assert_allclose(m["source_ce_sum"][s], ce_BT[where].sum(), rtol=1e-5)
    assert m["source_tokens"][s] == where.sum()
  np.testing.assert_allclose(m["source_ce_sum"].sum(), m["ce"] * m["loss_tokens"], rtol=1e-5)
  moe = MODEL.decoder.moe
  assert m["moe_load_balance_loss"] > 0 and m["moe_z_loss"] > 0
  np.testing.assert_allclose(
      loss, m["ce"] + moe.load_balance_weight * m["moe_load_balance_loss"] + moe.z_loss_weight * m["moe_z_loss"],
      rtol=1e-6)

  # Targets of masked positions (prompt, placeholders, padding) do not enter the loss at all.
  changed = dataclasses.replace(
      batch, targets=np.where(mask, batch.targets, (batch.targets + 7) % 256).astype(np.int32))
  assert (changed.targets != batch.targets).sum() == (~mask).sum()
  with sharding.use_mesh(single.mesh):
    _, loss2, m2 = jax.device_get(forward(single.state.params, changed))
  assert loss2 == loss and m2["ce"] == m["ce"]
  np.testing.assert_array_equal(m2["source_ce_sum"], m["source_ce_sum"])
  # ... while a trained target does.
  flipped = dataclasses.replace(
      batch, targets=np.where(mask, (batch.targets + 7) % 256, batch.targets).astype(np.int32))
  with sharding.use_mesh(single.mesh):
    _, loss3, _ = jax.device_get(forward(single.state.params, flipped))
  assert loss3 != loss


def max_rel_diff(a: dict, b: dict) -> dict[str, float]:
  """Per leaf: max |a - b| relative to max |a| (float32 sums in another order differ by a few ulps of the scale)."""
  return {k: float(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-30)) for k in a}


def assert_same_updates(before: dict, after_a: dict, after_b: dict):
  """Both steps moved every trainable parameter, and by the same amount up to float32 reordering."""
  moved = {k for k in before if not np.array_equal(after_a[k], before[k])}
  assert moved == {k for k in before if not k.startswith(FROZEN)}
  d_a = {k: after_a[k] - before[k] for k in moved if not k.endswith(ZERO_GRAD)}
  d_b = {k: after_b[k] - before[k] for k in d_a}
  bad = {k: v for k, v in max_rel_diff(d_a, d_b).items() if v > 1e-5}
  assert not bad, bad


def test_grad_accumulation_equals_one_batch(single, batch):
  accum = Setup(single.mesh, grad_accum=2, like=single)
  # Micro-batches with different token counts: the token weighting matters.
  counts = batch.loss_mask.reshape(2, 4, -1).sum((1, 2))
  assert counts[0] != counts[1]
  s1, m1 = single.step(single.state, batch)
  s2, m2 = accum.step(accum.state, batch)
  assert m1["nonfinite"] == 0 and m2["nonfinite"] == 0
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
  assert m2["loss_tokens"] == m1["loss_tokens"]
  np.testing.assert_allclose(m2["source_ce_sum"], m1["source_ce_sum"], rtol=1e-5)
  assert_same_updates(flat(single.state.params), flat(s1.params), flat(s2.params))
  assert int(s1.step) == int(s2.step) == 1


def test_nonfinite_step_leaves_state_unchanged(single, batch):
  params = jax.tree.map(lambda x: x, single.state.params)  # a new State holding the same arrays
  params["decoder"]["final_norm"]["scale"].value = jnp.full_like(params["decoder"]["final_norm"]["scale"][...],
                                                                 jnp.nan)
  bad = step_lib.TrainState(step=single.state.step, params=params, opt_state=single.state.opt_state)
  new, m = single.step(bad, batch)
  assert m["nonfinite"] == 1 and not np.isfinite(m["loss"])
  assert int(new.step) == 0
  before, after = jax.device_get(jax.tree.leaves(bad)), jax.tree.leaves(new)
  assert len(before) == len(after)
  for x, y in zip(before, after):
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))  # NaNs in the same places
  # The same state without the NaN takes a step.
  good, m = single.step(single.state, batch)
  assert m["nonfinite"] == 0 and int(good.step) == 1


def test_frozen_parameters_have_no_optimizer_state_and_do_not_move(single, batch):
  p0 = flat(single.state.params)
  frozen = {k for k in p0 if k.startswith(FROZEN)}
  assert len(frozen) == len(FROZEN)
  # No optimiser state: no leaf of the optimiser state belongs to a frozen parameter; every trainable one has some.
  # The optimiser works on the parameters' leaf list: an optimiser leaf's last path key is its parameter's index.
  names = [optim.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(single.state.params)]
  with_state = {names[p[-1].idx] for p, _ in jax.tree_util.tree_leaves_with_path(single.state.opt_state)
                if isinstance(p[-1], jax.tree_util.SequenceKey)}
  assert with_state == set(p0) - frozen
  all_trainable = optim.make_optimizer(dataclasses.replace(STAGE, trainable=".*"), single.state.params)
  full = sum(x.size for x in jax.tree.leaves(jax.eval_shape(all_trainable.init, single.state.params)))
  assert sum(x.size for x in jax.tree.leaves(single.state.opt_state)) < full

  new, m = single.step(single.state, batch)
  assert m["nonfinite"] == 0
  p1 = flat(new.params)
  for k in p0:
    if k in frozen:
      np.testing.assert_array_equal(p1[k], p0[k], err_msg=k)
    else:
      assert not np.array_equal(p1[k], p0[k]), k


def test_trainable_regex_errors_name_the_config_key():
  params = {"decoder": {"w": jnp.ones(2)}}
  with pytest.raises(ValueError, match="stages.*trainable"):
    optim.trainable_labels(params, "^vision/")
  with pytest.raises(ValueError, match="bad regex"):
    optim.trainable_labels(params, "(")


def test_warmup_cosine_schedule():
  stage = StageConfig(steps=100, learning_rate=1e-3, warmup_fraction=0.1, end_lr_fraction=0.1)
  assert optim.warmup_steps(stage) == 10
  lr = optim.schedule(stage)

  def expected(t):
    if t < 10:
      return 1e-3 * t / 10
    frac = min(t - 10, 90) / 90
    return 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * frac))

  for t in (0, 1, 5, 10, 11, 40, 55, 99, 100, 150):
    np.testing.assert_allclose(float(lr(t)), expected(t), rtol=1e-5, atol=1e-10, err_msg=f"step {t}")
  assert float(lr(55)) == pytest.approx(5.5e-4, rel=1e-5)  # half way down the cosine
  constant = optim.schedule(StageConfig(steps=100, learning_rate=2e-3, warmup_fraction=0.0, end_lr_fraction=1.0))
  assert [float(constant(t)) for t in (0, 50, 100)] == pytest.approx([2e-3] * 3, rel=1e-6)


def test_sharded_step_matches_single_device(single, batch):
  sharded = Setup(mesh_of(MeshConfig(data=2, fsdp=2, tensor=2)))
  specs = {s.spec for s in jax.tree.leaves(state_lib.state_shardings(sharded.state))}
  assert any("fsdp" in str(s) for s in specs) and any("tensor" in str(s) for s in specs)
  p_single, p_sharded = flat(single.state.params), flat(sharded.state.params)
  for k in p_single:  # the same seed gives the same initialisation on any mesh
    np.testing.assert_array_equal(p_sharded[k], p_single[k], err_msg=k)

  s1, m1 = single.step(single.state, batch)
  s8, m8 = sharded.step(sharded.state, batch)
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
  assert_same_updates(p_single, flat(s1.params), flat(s8.params))
  # The optimiser state follows the parameters' shardings (left to XLA it came out replicated on every device).
  params = jax.tree.leaves(sharded.state.params)
  logical = jax.tree.leaves(nnx.get_partition_spec(sharded.state.params),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  views = optim.adafactor_views(sharded.state.params)
  checked = 0
  for path, x in jax.tree_util.tree_leaves_with_path(sharded.state.opt_state):
    if not isinstance(path[-1], jax.tree_util.SequenceKey) or x.size == 1:
      continue
    i = path[-1].idx
    spec = padded_spec(params[i])
    # head_dim is never sharded, so the merged (heads, head_dim) axis is sharded as heads is.
    assert all(s is None for s, n in zip(spec, logical[i]) if n == "head_dim")
    spec = [s for s, n in zip(spec, logical[i]) if n != "head_dim"]
    if x.shape != views[i][1]:  # a factored row or column moment: its parameter's spec less the reduced axis
      d1, d0 = optim.factored_dims(views[i][1])
      del spec[d0 if path[-2].name == "v_row" else d1]
    assert padded_spec(x) == tuple(spec), (optim.path_str(path), x.sharding.spec, spec)
    checked += 1
  assert checked > 20


def padded_spec(x) -> tuple:
  return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))


def test_attention_kernels_are_factored_over_heads_times_head_dim():
  """AdaFactor on a [d, heads, head_dim] kernel is AdaFactor on the [d, heads * head_dim] matrix it is."""
  rng = np.random.default_rng(0)
  d, h, hd = 128, 4, 32
  kernel = nnx.Param(jnp.asarray(rng.normal(size=(d, h, hd)), jnp.float32),
                     out_sharding=("embed", "heads", "head_dim"), eager_sharding=False)
  params = nnx.State({"attn": {"q": kernel}})
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
  tx = optim.make_optimizer(StageConfig(steps=10, learning_rate=1e-2, warmup_fraction=0.0, clip_norm=0.0), params)
  state = tx.init(params)
  assert sorted(x.shape for x in jax.tree.leaves(state) if x.size > 1) == [(d,), (h * hd,)]  # factored moments
  updates, _ = tx.update(grads, state, params)
  matrix = optax.adafactor(learning_rate=1e-2, multiply_by_parameter_scale=False)
  w, g = kernel.get_value().reshape(d, h * hd), jax.tree.leaves(grads)[0].reshape(d, h * hd)
  expected, _ = matrix.update(g, matrix.init(w), w)
  np.testing.assert_allclose(jax.tree.leaves(updates)[0], expected.reshape(d, h, hd), rtol=1e-6)
