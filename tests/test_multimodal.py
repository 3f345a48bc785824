import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm15_jax.config import ConnectorConfig, DecoderConfig, ModelConfig, MoEConfig, SplitConfig, VisionConfig
from mm15_jax.data import images as images_lib
from mm15_jax.models import multimodal as mm
from mm15_jax.models import vit

IMG = 255  # image placeholder id
K = 4      # tokens per tile (pooled 2x2)


def tiny_config(**kw):
  return ModelConfig(
      vision=VisionConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64),
      connector=ConnectorConfig(hidden=32, depth=1, pooled_side=2),
      decoder=DecoderConfig(vocab_size=256, d_model=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_dim=128,
                            moe=MoEConfig(num_experts=4, top_k=2, every=2)),
      **kw)


def batch(seed=0):
  """4 rows (the batch splits over 4 batch shards in the sharded test); rows 2, 3 repeat rows 0, 1's layout."""
  rng = np.random.RandomState(seed)
  b, t, n = 4, 24, 3
  tokens = rng.randint(0, 200, (b, t)).astype(np.int32)
  tokens[0::2, 2:6] = IMG       # rows 0, 2: tiles 0 and 1
  tokens[0::2, 10:14] = IMG
  tokens[1::2, 0:4] = IMG       # rows 1, 3: tile 0 only; slots 1, 2 are padding
  images = rng.randint(0, 256, (b, n, 16, 16, 3)).astype(np.uint8)
  image_mask = np.array([[True, True, False], [True, False, False]] * 2)
  segment_ids = np.ones((b, t), np.int32)
  segment_ids[1::2, 18:] = 0
  positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
  return tokens, images, image_mask, segment_ids, positions


@jax.jit
def _call(graphdef, state, inputs):
  return nnx.merge(graphdef, state)(*inputs, image_token_id=IMG)


def call(model, *inputs):
  graphdef, state = nnx.split(model)
  return _call(graphdef, state, inputs)


def test_merge_puts_tile_embeddings_in_order():
  tokens = jnp.array([[5, IMG, IMG, 6, IMG, 7], [IMG, 8, 9, 9, 9, 9]])
  text = jnp.zeros((2, 6, 1))
  image = jnp.arange(2 * 4, dtype=jnp.float32).reshape(2, 4, 1) + 1
  out = np.asarray(mm.merge_image_embeddings(text, tokens, image, IMG))[..., 0]
  np.testing.assert_array_equal(out, [[0, 1, 2, 0, 3, 0], [5, 0, 0, 0, 0, 0]])


def test_forward_shapes_merge_positions_and_padded_tiles_unused():
  model = mm.MultimodalModel(tiny_config(dtype="float32"), rngs=nnx.Rngs(0))
  tokens, images, image_mask, seg, pos = batch()
  logits, aux = call(model, tokens, images, image_mask, seg, pos)
  assert logits.shape == (4, 24, 256) and logits.dtype == jnp.float32
  assert set(aux) == {"moe_load_balance_loss", "moe_z_loss", "moe_drop_rate"}
  x, tiles = nnx.jit(lambda m: (m.embed_inputs(tokens, images, image_mask, image_token_id=IMG),
                                m.encode_images(images)))(model)
  x, tiles = np.asarray(x), np.asarray(tiles)  # tiles: [B, N, K, D]
  np.testing.assert_allclose(x[0, 2:6], tiles[0, 0], atol=1e-6)
  np.testing.assert_allclose(x[0, 10:14], tiles[0, 1], atol=1e-6)
  np.testing.assert_allclose(x[1, 0:4], tiles[1, 0], atol=1e-6)
  np.testing.assert_allclose(x[0, 0], np.asarray(model.decoder.embed(tokens))[0, 0], atol=1e-6)
  # Padded tile slots never reach the decoder.
  images2 = images.copy()
  images2[0::2, 2] = 0
  images2[1::2, 1:] = 255 - images2[1::2, 1:]
  logits2, _ = call(model, tokens, images2, image_mask, seg, pos)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(logits2))
  # ... while a real tile does.
  images2[1, 0] = 255 - images2[1, 0]
  logits3, _ = call(model, tokens, images2, image_mask, seg, pos)
  assert np.abs(np.asarray(logits3[1, :4]) - np.asarray(logits[1, :4])).max() > 1e-4


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = mm.MultimodalModel(tiny_config(), rngs=nnx.Rngs(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  logits, _ = call(model, *batch())
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_resize_image_size_for_stage_transition():
  model = mm.MultimodalModel(tiny_config(dtype="float32"), rngs=nnx.Rngs(0))
  tokens, images, image_mask, seg, pos = batch()
  big = np.repeat(np.repeat(images, 2, axis=2), 2, axis=3)  # 32x32 tiles
  before = call(model, tokens, big, image_mask, seg, pos)[0]
  vit.resize_image_size(model, 32)
  assert model.vision.pos_embedding.shape == (65, 32) and model.connector.pos_embedding.shape == (64, 32)
  after = call(model, tokens, big, image_mask, seg, pos)[0]
  np.testing.assert_allclose(np.asarray(after), np.asarray(before), atol=1e-5)
  # The same on a parameter State (how a restored checkpoint is resized).
  fresh = mm.MultimodalModel(tiny_config(dtype="float32"), rngs=nnx.Rngs(0))
  params = vit.resize_params_image_size(nnx.state(fresh, nnx.Param), 32, patch_size=4)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.state(model, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def split_sources(pixels_list, cfg, tile):
  """(sources uint8 [N, S, S, 3], extents int32 [N, 4], host tiles uint8 [N, S, S, 3]) of images split by `cfg`, plus
  one unused slot (zeros)."""
  splits = [images_lib.split_image(p, cfg, tile_size=tile) for p in pixels_list]
  n = sum(s.n_tiles for s in splits) + 1
  sources, extents = np.zeros((n, tile, tile, 3), np.uint8), np.zeros((n, 4), np.int32)
  host = np.zeros_like(sources)
  start = 0
  for s in splits:
    s.write_sources(sources[start:start + s.n_tiles], extents[start:start + s.n_tiles])
    s.write_tiles(host[start:start + s.n_tiles])
    start += s.n_tiles
  return sources, extents, host


def test_enlarge_tiles_equals_the_host_resize_and_its_definition():
  from test_images import interpolation_weights, natural_image
  tile = 40
  pixels = [natural_image(30, 52, seed=1), natural_image(24, 21, seed=2), natural_image(90, 70, seed=3)]
  cfg = SplitConfig(mode="dynamic", n_min=2, n_max=4)
  sources, extents, host = split_sources(pixels, cfg, tile)
  enlarged = extents[:, 0] < extents[:, 2]
  assert enlarged.sum() >= 5 and (~enlarged[:-1]).any()  # enlarged blocks and host-shrunk ones; the last unused
  got = np.asarray(jax.jit(mm.enlarge_tiles)(sources, extents))
  assert got.dtype == np.float32 and got.shape == host.shape
  # The host's OpenCV resize, to within its fixed-point rounding; the unused slot all padding.
  diff = np.abs(got[:-1] - host[:-1])
  assert diff.max() <= 1 and diff.mean() < 0.3, (diff.max(), diff.mean())
  assert (got[-1] == images_lib.PAD_RGB).all()
  # The bicubic definition (float64, not rounded) on each enlarged block.
  for n in np.flatnonzero(enlarged):
    b_h, b_w, h, w = extents[n]
    block = sources[n, :b_h, :b_w].astype(np.float64)
    want = np.einsum("oi,ijc,pj->opc", interpolation_weights(b_h, h, "cubic"), block,
                     interpolation_weights(b_w, w, "cubic"))
    np.testing.assert_allclose(got[n, :h, :w], np.clip(want, 0, 255), atol=2e-3)
    assert (got[n, h:] == images_lib.PAD_RGB).all() and (got[n, :, w:] == images_lib.PAD_RGB).all()


def test_encode_images_enlarges_with_extents():
  model = mm.MultimodalModel(tiny_config(dtype="float32"), rngs=nnx.Rngs(0))
  from test_images import natural_image
  sources, extents, host = split_sources([natural_image(20, 26, seed=4), natural_image(20, 20, seed=5)],
                                         SplitConfig(mode="static", static_grid=2), 16)
  sources, extents, host = sources[None], extents[None], host[None]  # one row
  got = nnx.jit(lambda m: m.encode_images(sources, extents))(model)
  want = nnx.jit(lambda m: m.encode_images(mm.enlarge_tiles(sources[0], extents[0])[None]))(model)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  rounded = nnx.jit(lambda m: m.encode_images(host))(model)  # the host's uint8 tiles: within their rounding
  np.testing.assert_allclose(np.asarray(got)[:, :-1], np.asarray(rounded)[:, :-1], atol=0.05)  # the last unused
  assert np.abs(np.asarray(got) - np.asarray(nnx.jit(lambda m: m.encode_images(sources))(model))).max() > 0.1
