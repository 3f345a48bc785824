"""CLIP-style ViT image encoder (as HF CLIPVisionModel / OpenAI & DFN CLIP).

Conv patch embedding (no bias), class token, learned position embeddings (bicubically interpolated on the patch grid
when the input size differs from `image_size`), `pre_norm` LayerNorm, pre-LN blocks with separate q/k/v projections
with bias. The encoder returns the patch tokens (class token dropped) of `feature_layer`; the final post-LayerNorm of
CLIP (which only feeds the pooled class embedding) is not part of it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mm15_jax.config import VisionConfig
from mm15_jax.kernels import attention as attention_lib
from mm15_jax.models import layers
from mm15_jax.sharding import constrain

ACT_NAMES = ("batch", "length", "vit_embed")


class VitAttention(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, attention: str = "auto", rngs: nnx.Rngs):
    w, h = cfg.width, cfg.num_heads
    if w % h:
      raise ValueError(f"model.vision.width {w} is not divisible by model.vision.num_heads {h}")
    hd = w // h
    init = layers.fan_in_init(w)
    mk = lambda shape, names, i=init: layers.param(rngs, i, shape, names, param_dtype)
    self.q = mk((w, h, hd), ("vit_embed", "vit_heads", "head_dim"))
    self.k = mk((w, h, hd), ("vit_embed", "vit_heads", "head_dim"))
    self.v = mk((w, h, hd), ("vit_embed", "vit_heads", "head_dim"))
    self.q_bias = mk((h, hd), ("vit_heads", "head_dim"), layers.zeros_init)
    self.k_bias = mk((h, hd), ("vit_heads", "head_dim"), layers.zeros_init)
    self.v_bias = mk((h, hd), ("vit_heads", "head_dim"), layers.zeros_init)
    self.o = mk((h, hd, w), ("vit_heads", "head_dim", "vit_embed"), layers.fan_in_init(w))
    self.o_bias = mk((w,), ("vit_embed",), layers.zeros_init)
    self.dtype, self.attention = dtype, attention

  def __call__(self, x_BLD):
    dt = self.dtype
    proj = lambda w, b: layers.project(x_BLD, w[...].astype(dt)) + b[...].astype(dt)  # [B, L, heads, head_dim]
    q_BLHK = proj(self.q, self.q_bias)
    k_BLHK = proj(self.k, self.k_bias)
    v_BLHK = proj(self.v, self.v_bias)
    out_BLHK = attention_lib.full_attention(q_BLHK, k_BLHK, v_BLHK, dt, impl=self.attention)
    return layers.project(out_BLHK, self.o[...].astype(dt), n_contract=2) + self.o_bias[...].astype(dt)


class VitBlock(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, attention: str = "auto", rngs: nnx.Rngs):
    ln = lambda: layers.LayerNorm(cfg.width, "vit_embed", eps=cfg.layer_norm_eps, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.norm1 = ln()
    self.attn = VitAttention(cfg, dtype=dtype, param_dtype=param_dtype, attention=attention, rngs=rngs)
    self.norm2 = ln()
    self.fc1 = layers.Linear(cfg.width, cfg.mlp_dim, ("vit_embed", "vit_mlp"), use_bias=True, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)
    self.fc2 = layers.Linear(cfg.mlp_dim, cfg.width, ("vit_mlp", "vit_embed"), use_bias=True, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)
    self.act = layers.activation(cfg.act)

  def __call__(self, x_BLD):
    x_BLD = x_BLD + self.attn(self.norm1(x_BLD))
    h_BLF = self.act(self.fc1(self.norm2(x_BLD)))
    h_BLF = constrain(h_BLF, ("batch", "length", "vit_mlp"))
    return constrain(x_BLD + self.fc2(h_BLF), ACT_NAMES)


class VisionTransformer(nnx.Module):
  """images [B, H, W, 3] (already normalised) -> patch tokens [B, (H/p)*(W/p), width] of `feature_layer`."""

  def __init__(self, cfg: VisionConfig, *, dtype="bfloat16", param_dtype="float32", remat: str = "none",
               scan_layers: bool = True, attention: str = "auto", rngs: nnx.Rngs):
    if cfg.image_size % cfg.patch_size:
      raise ValueError(f"model.vision.image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    # Plain attributes (not the config object) keep the graphdef hashable.
    self.patch_size, self.depth, self.feature_layer = cfg.patch_size, cfg.depth, cfg.feature_layer
    self.image_size = cfg.image_size
    self.dtype = layers.dtype_of(dtype)
    pdt = layers.dtype_of(param_dtype)
    self.remat, self.scan_layers = remat, scan_layers
    attention_lib.check_impl(attention)
    p, w = cfg.patch_size, cfg.width
    side = cfg.image_size // p
    self.patch_kernel = layers.param(rngs, layers.fan_in_init(p * p * 3), (p, p, 3, w),
                                     (None, None, None, "vit_embed"), pdt)
    self.class_embedding = layers.param(rngs, layers.normal_init(w ** -0.5), (w,), ("vit_embed",), pdt)
    self.pos_embedding = layers.param(rngs, layers.normal_init(0.02), (1 + side * side, w), ("tokens", "vit_embed"),
                                      pdt)
    self.pre_norm = (layers.LayerNorm(w, "vit_embed", eps=cfg.layer_norm_eps, dtype=self.dtype, param_dtype=pdt,
                                      rngs=rngs) if cfg.pre_norm else None)
    self.blocks = layers.stacked(
        cfg.depth, lambda r: VitBlock(cfg, dtype=self.dtype, param_dtype=pdt, attention=attention, rngs=r), rngs)

  @property
  def grid_side(self) -> int:
    """Patch-grid side the stored position embeddings are laid out for."""
    return int(round((self.pos_embedding.shape[0] - 1) ** 0.5))

  def num_blocks_to_run(self) -> int:
    """Hidden states are (embeddings, block 1, ..., block depth); feature_layer indexes them as HF/LLaVA do."""
    n = self.depth + 1
    idx = self.feature_layer
    if not -n <= idx < n:
      raise ValueError(f"model.vision.feature_layer {idx} out of range for depth {self.depth}")
    return idx % n

  def position_embeddings(self, grid_h: int, grid_w: int):
    """[1 + grid_h*grid_w, width]; patch part resized bicubically when the grid differs (class token kept)."""
    pos = self.pos_embedding[...]
    side = self.grid_side
    if (grid_h, grid_w) == (side, side):
      return pos
    patch = layers.resize_grid_bicubic(pos[1:].reshape(side, side, -1), grid_h, grid_w)
    return jnp.concatenate([pos[:1], patch.reshape(grid_h * grid_w, -1)], axis=0)

  def embed(self, images_BHWC):
    b, h, w, c = images_BHWC.shape
    p = self.patch_size
    if h % p or w % p or c != 3:
      raise ValueError(f"image batch of shape {images_BHWC.shape} is not [B, H, W, 3] with H, W multiples of {p}")
    gh, gw = h // p, w // p
    x = images_BHWC.astype(self.dtype).reshape(b, gh, p, gw, p, 3)
    x_BLD = jnp.einsum("bhpwqc,pqcd->bhwd", x, self.patch_kernel[...].astype(self.dtype)).reshape(b, gh * gw, -1)
    cls_B1D = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, x_BLD.shape[-1]))
    x_BLD = jnp.concatenate([cls_B1D, x_BLD], axis=1) + self.position_embeddings(gh, gw).astype(self.dtype)
    if self.pre_norm is not None:
      x_BLD = self.pre_norm(x_BLD)
    return constrain(x_BLD, ACT_NAMES)

  def __call__(self, images_BHWC, *, return_hidden: bool = False):
    """Returns patch tokens [B, L, width]; with return_hidden also all hidden states [depth_run + 1, B, 1 + L, width]."""
    x_BLD = self.embed(images_BHWC)
    length = self.num_blocks_to_run()
    body = lambda blk, x, _: (lambda y: (y, y if return_hidden else None))(blk(x))
    out_BLD, hidden = layers.run_stack(self.blocks, body, x_BLD, length=length, scan=self.scan_layers,
                                       remat=self.remat)
    feats = out_BLD[:, 1:]
    if not return_hidden:
      return feats
    hidden = x_BLD[None] if hidden is None else jnp.concatenate([x_BLD[None], hidden], axis=0)
    return feats, hidden


def resize_position_embedding(pos_LD: jax.Array, new_side: int, *, has_class_token: bool) -> jax.Array:
  """Bicubic resize of a square grid of position embeddings to new_side x new_side (class token row kept)."""
  head, grid = (pos_LD[:1], pos_LD[1:]) if has_class_token else (pos_LD[:0], pos_LD)
  side = int(round(grid.shape[0] ** 0.5))
  if side * side != grid.shape[0]:
    raise ValueError(f"position embeddings of shape {pos_LD.shape} do not form a square grid")
  new = layers.resize_grid_bicubic(grid.reshape(side, side, -1), new_side, new_side)
  return jnp.concatenate([head, new.reshape(new_side * new_side, -1)], axis=0)


def resize_image_size(model: nnx.Module, new_image_size: int) -> None:
  """Stage transition (e.g. 378 -> 672): permanently resizes the stored ViT and connector position embeddings.

  `model` is a MultimodalModel (attributes `vision`, `connector`) or a VisionTransformer. The stored parameters get
  new shapes, so do this before building optimiser state / shardings for the new stage.
  """
  vision = getattr(model, "vision", model)
  p = vision.patch_size
  if new_image_size % p:
    raise ValueError(f"new image size {new_image_size} is not a multiple of patch size {p}")
  side = new_image_size // p
  vision.pos_embedding.set_value(resize_position_embedding(vision.pos_embedding[...], side, has_class_token=True))
  vision.image_size = new_image_size
  connector = getattr(model, "connector", None)
  if connector is not None:
    connector.pos_embedding.set_value(
        resize_position_embedding(connector.pos_embedding[...], side, has_class_token=False))


def resize_params_image_size(params, new_image_size: int, patch_size: int):
  """`resize_image_size` on an nnx.State of MultimodalModel parameters (e.g. a restored checkpoint), in place.

  Without this, a model whose stored grid differs from its input interpolates on the fly every step (same values).
  """
  if new_image_size % patch_size:
    raise ValueError(f"new image size {new_image_size} is not a multiple of patch size {patch_size}")
  side = new_image_size // patch_size
  for part, has_cls in (("vision", True), ("connector", False)):
    var = params[part]["pos_embedding"]
    var.set_value(resize_position_embedding(var.get_value(), side, has_class_token=has_cls))
  return params
