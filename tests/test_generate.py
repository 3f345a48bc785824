import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mm15_jax.config import ConnectorConfig, DecoderConfig, ModelConfig, MoEConfig, VisionConfig
from mm15_jax.eval import generate
from mm15_jax.models.multimodal import MultimodalModel

IMG, EOS = 255, 1


def tiny_model(moe=True):
  cfg = ModelConfig(
      vision=VisionConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64),
      connector=ConnectorConfig(hidden=32, depth=1, pooled_side=2),
      decoder=DecoderConfig(vocab_size=256, d_model=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_dim=128,
                            moe=MoEConfig(num_experts=4, top_k=2, every=2) if moe else None),
      dtype="float32")
  return MultimodalModel(cfg, rngs=nnx.Rngs(0))


def prompts():
  rng = np.random.RandomState(0)
  tokens = rng.randint(2, 200, (2, 10)).astype(np.int32)
  tokens[0, 1:5] = IMG                   # row 0: one tile, prompt of 9 tokens
  tokens[1, 0:4] = IMG                   # row 1: two tiles, prompt of 10 tokens
  tokens[1, 5:9] = IMG
  tokens[0, 9] = 0                       # padding
  images = rng.randint(0, 256, (2, 2, 16, 16, 3)).astype(np.uint8)
  image_mask = np.array([[True, False], [True, True]])
  return tokens, images, image_mask, np.array([9, 10], np.int32)


def recompute_greedy(model, tokens, images, image_mask, lengths, steps):
  """Reference: rerun the whole (right-padded) sequence every step, no cache."""
  b, t = tokens.shape
  total = t + steps
  seq = np.zeros((b, total), np.int32)
  seq[:, :t] = tokens
  graphdef, state = nnx.split(model)

  @jax.jit
  def logits_of(state, seq, seg):
    pos = jnp.broadcast_to(jnp.arange(total), (b, total))
    return nnx.merge(graphdef, state)(seq, images, image_mask, seg, pos, image_token_id=IMG)[0]

  cur = lengths.copy()
  out = []
  for _ in range(steps):
    seg = (np.arange(total)[None] < cur[:, None]).astype(np.int32)
    logits = np.asarray(logits_of(state, seq, seg))
    nxt = logits[np.arange(b), cur - 1].argmax(-1)
    seq[np.arange(b), cur] = nxt
    cur = cur + 1
    out.append(nxt)
  return np.stack(out, 1)


@pytest.fixture(scope="module")
def model():
  return tiny_model(moe=True)  # units of a dense and an MoE layer: both cache paths


def test_cached_greedy_equals_recompute(model):
  tokens, images, image_mask, lengths = prompts()
  steps = 6
  got = np.asarray(generate.greedy_generate(model, tokens, images, image_mask, image_token_id=IMG, eos_id=-1,
                                            max_new_tokens=steps, prompt_lengths=lengths))
  want = recompute_greedy(model, tokens, images, image_mask, lengths, steps)
  np.testing.assert_array_equal(got, want)


def test_eos_fills_rest_of_row(model):
  tokens, images, image_mask, lengths = prompts()
  free = np.asarray(generate.greedy_generate(model, tokens, images, image_mask, image_token_id=IMG, eos_id=-1,
                                             max_new_tokens=5, prompt_lengths=lengths))
  eos = int(free[0, 1])  # make row 0's second token the eos
  got = np.asarray(generate.greedy_generate(model, tokens, images, image_mask, image_token_id=IMG, eos_id=eos,
                                            max_new_tokens=5, prompt_lengths=lengths))
  first = int(np.argmax(free[0] == eos))
  np.testing.assert_array_equal(got[0, :first + 1], free[0, :first + 1])
  assert (got[0, first:] == eos).all()


def test_rows_outside_live_rows_are_done_from_the_start(model):
  tokens, images, image_mask, lengths = prompts()
  both = np.asarray(generate.greedy_generate(model, tokens, images, image_mask, image_token_id=IMG, eos_id=EOS,
                                             max_new_tokens=5, prompt_lengths=lengths))
  assert (both[1, 1:] != EOS).any()  # row 1 alone would keep the loop running
  one = np.asarray(generate.greedy_generate(model, tokens, images, image_mask, image_token_id=IMG, eos_id=EOS,
                                            max_new_tokens=5, prompt_lengths=lengths, live_rows=[True, False]))
  np.testing.assert_array_equal(one[0], both[0])
  assert (one[1, 1:] == EOS).all()


def test_top_p_sampling_stays_in_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draws = np.asarray(jax.vmap(lambda k: generate.pick_token(logits, k, 1.0, 0.75))(keys)).ravel()
  assert set(draws) == {0, 1}  # 0.5 + 0.3 reaches 0.75; tokens 2, 3 are outside the nucleus
  assert 0.5 < (draws == 0).mean() < 0.75  # renormalised: 0.5 / 0.8 = 0.625
  greedy = generate.pick_token(logits, keys[0], 0.0, 1.0)
  assert int(greedy[0]) == 0
  many = jax.vmap(lambda k: generate.pick_token(logits, k, 1.0, 1.0))(keys)
  assert set(np.asarray(many).ravel().tolist()) == {0, 1, 2, 3}


def test_generation_enlarges_tiles_with_extents(model):
  # Sources of 6 - 10 px blocks enlarged onto the 16 px tiles inside the model, against generating from the same tiles
  # enlarged beforehand; and the extents do change the answer's logits (the images are not ignored).
  from mm15_jax.models.multimodal import enlarge_tiles
  tokens, images, image_mask, lengths = prompts()
  extent = np.array([[[8, 6, 16, 12], [0, 0, 0, 0]], [[10, 10, 16, 16], [7, 9, 12, 16]]], np.int32)
  kw = dict(image_token_id=IMG, eos_id=-1, max_new_tokens=6, prompt_lengths=lengths)
  got = np.asarray(generate.greedy_generate(model, tokens, images, image_mask, image_extent=extent, **kw))
  enlarged = np.asarray(jax.jit(enlarge_tiles)(images.reshape(4, 16, 16, 3), extent.reshape(4, 4)))
  want = np.asarray(generate.greedy_generate(model, tokens, enlarged.reshape(images.shape), image_mask, **kw))
  np.testing.assert_array_equal(got, want)
  plain = recompute_greedy(model, tokens, images, image_mask, lengths, 6)
  assert (got != plain).any()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_stream_equals_batched_generation(model, temperature):
  """Token by token from Python, the same tokens as the one-program loop (greedy, and sampling with one seed)."""
  tokens, images, image_mask, lengths = prompts()
  row = (tokens[1:], images[1:], image_mask[1:])  # the unpadded prompt
  want = np.asarray(generate.sample_generate(model, *row, image_token_id=IMG, eos_id=EOS, max_new_tokens=6,
                                             prompt_lengths=lengths[1:], temperature=temperature, top_p=0.9,
                                             seed=3))[0].tolist()
  want = want[:want.index(EOS)] if EOS in want else want
  got = list(generate.stream_generate(model, *row, image_token_id=IMG, stop_ids={EOS}, max_new_tokens=6,
                                      temperature=temperature, top_p=0.9, seed=3))
  assert got == want and len(got) > 0
