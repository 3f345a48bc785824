"""The multimodal model: ViT -> C-Abstractor -> image embeddings merged into the decoder's token embeddings.

Image tiles [B, N, S, S, 3] uint8 (finished, or with image_extent [B, N, 4] the source pixels that `enlarge_tiles`
resizes onto each tile) are normalised with CLIP's mean/std, each tile is encoded once, and the placeholder
positions (tokens == image_token_id) of row b receive, in order, the N*K tile embeddings of row b (K tokens per
tile). The data pipeline puts exactly K placeholders per real tile, so padded tile slots are never referenced.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from mm15_jax import sharding
from mm15_jax.config import ModelConfig
from mm15_jax.data.images import PAD_RGB
from mm15_jax.models.connector import CAbstractor
from mm15_jax.models.decoder import Decoder, head_logits, upcycle_from_dense
from mm15_jax.models.vit import VisionTransformer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_images(images):
  """uint8 (or float) pixels in 0..255 -> CLIP-normalised float32."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def _keys_cubic(t):
  """Bicubic convolution kernel at distances t >= 0 (a = -0.75, OpenCV's INTER_CUBIC)."""
  a = -0.75
  near = ((a + 2) * t - (a + 3)) * t * t + 1
  far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  return jnp.where(t <= 1, near, jnp.where(t < 2, far, 0.0))


def cubic_weights(n_in_N, n_out_N, size: int):
  """float32 [N, size, size]: row o of matrix n resamples n_in[n] source pixels onto n_out[n] output pixels at pixel
  centres (OpenCV's mapping, edges replicated); rows from n_out[n] on are zero."""
  out = jnp.arange(size, dtype=jnp.float32)
  scale = n_in_N.astype(jnp.float32) / jnp.maximum(n_out_N, 1).astype(jnp.float32)
  x_NO = (out + 0.5) * scale[:, None] - 0.5  # source coordinate of each output pixel
  x0_NO = jnp.floor(x_NO)
  frac_NO = x_NO - x0_NO
  last_N1 = jnp.maximum(n_in_N - 1, 0)[:, None]
  weights_NOI = jnp.zeros((n_in_N.shape[0], size, size), jnp.float32)
  for tap in (-1, 0, 1, 2):
    source_NO = jnp.clip(x0_NO.astype(jnp.int32) + tap, 0, last_N1)
    onehot_NOI = source_NO[..., None] == jnp.arange(size)
    weights_NOI += jnp.where(onehot_NOI, _keys_cubic(jnp.abs(tap - frac_NO))[..., None], 0.0)
  return jnp.where((out < n_out_N[:, None])[..., None], weights_NOI, 0.0)


def enlarge_tiles(images_NSSC, extent_N4):
  """Tiles resized on the accelerator (data.split.enlarge_on_device): slot n's top-left extent[n, :2] (rows, cols)
  source pixels, bicubically resized onto the tile's top-left extent[n, 2:] pixels, PAD_RGB elsewhere; the host's
  "fast" resize of the same block to within rounding (uint8 [N, S, S, 3] -> float32 0..255, not rounded).

  Two [S, S] products per tile (float32 precision, so that pixel values keep their 8 bits on TPU's MXU):
  4 S^3 * 3 FLOPs, ~0.1% of the ViT-H forward pass on the tile at S = 672."""
  s = images_NSSC.shape[1]
  rows_NOI = cubic_weights(extent_N4[:, 0], extent_N4[:, 2], s)
  cols_NPJ = cubic_weights(extent_N4[:, 1], extent_N4[:, 3], s)
  x = images_NSSC.astype(jnp.float32)
  x = jnp.einsum("noi,nijc->nojc", rows_NOI, x, precision=jax.lax.Precision.HIGHEST)
  x = jnp.einsum("npj,nojc->nopc", cols_NPJ, x, precision=jax.lax.Precision.HIGHEST)
  out = jnp.arange(s)
  inside_NOP = (out < extent_N4[:, 2, None])[:, :, None] & (out < extent_N4[:, 3, None])[:, None, :]
  return jnp.where(inside_NOP[..., None], jnp.clip(x, 0.0, 255.0), jnp.asarray(PAD_RGB, jnp.float32))


def merge_image_embeddings(text_BTD, tokens_BT, image_BMD, image_token_id: int):
  """Placeholder j (in order) of row b takes image_BMD[b, j]; other positions keep their text embedding."""
  is_image_BT = tokens_BT == image_token_id
  index_BT = jnp.clip(jnp.cumsum(is_image_BT, axis=1) - 1, 0, image_BMD.shape[1] - 1)
  gathered_BTD = jnp.take_along_axis(image_BMD, index_BT[..., None], axis=1)
  return jnp.where(is_image_BT[..., None], gathered_BTD.astype(text_BTD.dtype), text_BTD)


class MultimodalModel(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.vision = VisionTransformer(cfg.vision, remat=cfg.remat, scan_layers=cfg.scan_layers,
                                    attention=cfg.attention, **common)
    self.connector = CAbstractor(cfg.connector, in_dim=cfg.vision.width, out_dim=cfg.decoder.d_model,
                                 grid_side=cfg.vision.image_size // cfg.vision.patch_size, **common)
    self.decoder = Decoder(cfg.decoder, remat=cfg.remat, scan_layers=cfg.scan_layers, attention=cfg.attention,
                           **common)

  @property
  def tokens_per_tile(self) -> int:
    return self.connector.tokens_per_image

  def encode_images(self, images_BNSSC, image_extent_BN4=None):
    """uint8 tiles [B, N, S, S, 3] (source pixels to enlarge with image_extent) -> [B, N, K, d_model] in the compute
    dtype."""
    b, n, s, s2, c = images_BNSSC.shape
    tiles = images_BNSSC.reshape(b * n, s, s2, c)
    if image_extent_BN4 is not None:
      tiles = sharding.constrain(tiles, ("batch", None, None, None))
      tiles = enlarge_tiles(tiles, image_extent_BN4.reshape(b * n, 4))
    tiles = normalize_images(tiles)
    tiles = sharding.constrain(tiles, ("batch", None, None, None))
    feats = self.vision(tiles)
    emb = self.connector(feats)
    return emb.reshape(b, n, emb.shape[1], emb.shape[2])

  def embed_inputs(self, tokens_BT, images_BNSSC, image_mask_BN, *, image_token_id: int, image_extent_BN4=None):
    del image_mask_BN  # padded tiles are encoded (static shapes) but never referenced by a placeholder
    text_BTD = self.decoder.embed(tokens_BT)
    if images_BNSSC is None or images_BNSSC.shape[1] == 0:
      return text_BTD
    img_BNKD = self.encode_images(images_BNSSC, image_extent_BN4)
    b, n, k, d = img_BNKD.shape
    x = merge_image_embeddings(text_BTD, tokens_BT, img_BNKD.reshape(b, n * k, d), image_token_id)
    return sharding.constrain(x, ("batch", "length", "embed"))

  def __call__(self, tokens, images, image_mask, segment_ids, positions, *, image_token_id: int, image_extent=None):
    """-> (logits [B, T, V] float32, aux {moe_load_balance_loss, moe_z_loss, moe_drop_rate})."""
    x_BTD, aux = self.hidden(tokens, images, image_mask, segment_ids, positions, image_token_id=image_token_id,
                             image_extent=image_extent)
    return self.decoder.logits(x_BTD), aux

  def hidden(self, tokens, images, image_mask, segment_ids, positions, *, image_token_id: int, image_extent=None):
    """-> (the decoder's last hidden states [B, T, D], aux); `self.decoder.logits` maps them to the logits."""
    x_BTD = self.embed_inputs(tokens, images, image_mask, image_token_id=image_token_id, image_extent_BN4=image_extent)
    x_BTD, aux, _ = self.decoder.hidden(x_BTD, segment_ids, positions)
    return x_BTD, aux

  def head_inputs(self, inputs, *, image_token_id: int):
    """What a fused LM-head loss needs: (final-normed hidden states [B, T, D], the head [D, V] in the compute dtype,
    aux). `inputs`: a data.batch.Batch (its model inputs are read). `head_logits(x, w)` maps any slice of the
    states to logits exactly as `__call__` does."""
    x_BTD, aux = self.hidden(inputs.tokens, inputs.images, inputs.image_mask, inputs.segment_ids, inputs.positions,
                             image_token_id=image_token_id, image_extent=inputs.image_extent)
    return self.decoder.final_norm(x_BTD), self.decoder.head_weight(), aux

  head_logits = staticmethod(head_logits)

  def prefill(self, tokens, images, image_mask, segment_ids, positions, *, image_token_id: int, max_len: int,
              image_extent=None):
    """Right-padded prompts -> (logits [B, T, V], KV cache with room for max_len tokens)."""
    x_BTD = self.embed_inputs(tokens, images, image_mask, image_token_id=image_token_id, image_extent_BN4=image_extent)
    logits, _, cache = self.decoder.prefill(x_BTD, segment_ids, positions, max_len=max_len)
    return logits, cache

  def decode(self, token_B, position_B, cache):
    """One text token per row -> (logits [B, V], updated cache)."""
    x_B1D = self.decoder.embed(token_B[:, None])
    logits, _, cache = self.decoder.decode(x_B1D, position_B[:, None], cache)
    return logits[:, 0], cache


def init_sharded(cfg: ModelConfig, mesh: Mesh, seed: int = 0) -> MultimodalModel:
  """Builds the model with every parameter created directly in its shards (no full copy on one device)."""
  abstract = nnx.eval_shape(lambda: MultimodalModel(cfg, rngs=nnx.Rngs(seed)))
  graphdef, abstract_state = nnx.split(abstract)
  shardings = sharding.param_shardings(abstract_state, mesh)

  def init():
    return nnx.state(MultimodalModel(cfg, rngs=nnx.Rngs(seed)))

  with sharding.use_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def upcycle_model(dense: MultimodalModel, moe: MultimodalModel) -> None:
  """Initialises an MoE model from a dense one: encoder and connector copied, decoder sparsely upcycled."""
  nnx.update(moe.vision, nnx.state(dense.vision, nnx.Param))
  nnx.update(moe.connector, nnx.state(dense.connector, nnx.Param))
  upcycle_from_dense(dense.decoder, moe.decoder)
