"""open_clip vision towers (e.g. DFN5B-CLIP-ViT-H-14-378, the paper's encoder on the Hub) -> the project's ViT.

A directory in open_clip's Hub layout: `open_clip_config.json` ({"model_cfg": {"vision_cfg": {...}, "quick_gelu":
...}}) and `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`. Keys (under `visual.`, or bare):
  conv1.weight [W, 3, p, p] (no bias), class_embedding [W], positional_embedding [1 + g*g, W], ln_pre.{weight,bias},
  transformer.resblocks.{i}.{ln_1, ln_2}.{weight,bias}, .attn.in_proj_{weight [3W, W], bias [3W]} (q, k, v stacked),
  .attn.out_proj.{weight,bias}, .mlp.c_fc.{weight,bias}, .mlp.c_proj.{weight,bias}.
ln_post and proj feed only the pooled embedding; the text tower belongs to the contrastive model: both unused.
Variants the ViT does not have (layer scale ls_1/ls_2, attentional pooling, no ln_pre, other position embeddings)
are refused by name.
"""
from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from mm15_jax.config import VisionConfig
from mm15_jax.convert import hf_import
from mm15_jax.convert.hf_import import DictStore, SafetensorsStore, View

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
UNUSED = (r"(visual\.)?ln_post\..*", r"(visual\.)?proj", r"(visual\.)?attn_pool\..*", r"logit_scale", r"logit_bias",
          r"text\..*", r"transformer\..*", r"token_embedding\..*", r"positional_embedding", r"ln_final\..*",
          r"text_projection")
REFUSED = {"ls_init_value": "layer scale", "attentional_pool": "attentional pooling", "no_ln_pre": "no ln_pre",
           "input_patchnorm": "patch norm", "final_ln_after_pool": "a final norm after pooling"}


def is_open_clip(directory: str) -> bool:
  return epath.Path(directory, CONFIG_FILE).exists()


def holds_open_clip(store) -> bool:
  """Whether a tensor store is in open_clip's layout (its patch embedding is `conv1`)."""
  return "visual.conv1.weight" in store or "conv1.weight" in store


def vision_config(directory: str) -> VisionConfig:
  """open_clip_config.json's vision_cfg -> VisionConfig (open_clip's defaults where a key is absent)."""
  path = epath.Path(directory, CONFIG_FILE)
  model_cfg = json.loads(path.read_text()).get("model_cfg", {})
  v = model_cfg.get("vision_cfg", {})
  for key, what in REFUSED.items():
    if v.get(key):
      raise ValueError(f"{path}: vision_cfg.{key}={v[key]!r} ({what}) is not supported by the ViT")
  if v.get("pos_embed_type", "learnable") != "learnable" or v.get("timm_model_name"):
    raise ValueError(f"{path}: only open_clip's own ViT with learned position embeddings is supported")
  width, head_width = v.get("width", 768), v.get("head_width", 64)
  image_size, patch_size = v.get("image_size", 224), v.get("patch_size", 16)
  if isinstance(image_size, (list, tuple)) or isinstance(patch_size, (list, tuple)):
    raise ValueError(f"{path}: non-square image_size / patch_size are not supported")
  return VisionConfig(image_size=image_size, patch_size=patch_size, width=width, depth=v.get("layers", 12),
                      num_heads=width // head_width, mlp_dim=int(width * v.get("mlp_ratio", 4.0)),
                      act="quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu", layer_norm_eps=1e-5,
                      pre_norm=True)


def open_store(directory: str):
  """The weights file: safetensors read block by block, or a torch pickle read whole (needs torch)."""
  names = [n for n in WEIGHT_FILES if os.path.exists(os.path.join(directory, n))]
  if not names:
    raise FileNotFoundError(f"{directory} has {CONFIG_FILE} but none of {', '.join(WEIGHT_FILES)}")
  path = os.path.join(directory, names[0])
  if path.endswith(".safetensors"):
    return SafetensorsStore(directory, files=[path])
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{path} is a torch pickle: reading it needs torch (pip install torch)") from e
  state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  state = state.get("state_dict", state)
  return DictStore({k: v.float().numpy() for k, v in state.items()})


def vision_sources(store, cfg: VisionConfig) -> dict[hf_import.Path, Any]:
  """open_clip visual tensors -> VisionTransformer parameter sources."""
  pre = hf_import._prefix(store, ("visual.", ""), "class_embedding")
  heads, hd = cfg.num_heads, cfg.width // cfg.num_heads
  v = lambda name, **kw: View(store, pre + name, **kw)
  out = {("patch_kernel",): v("conv1.weight", perm=(2, 3, 1, 0)), ("class_embedding",): v("class_embedding"),
         ("pos_embedding",): v("positional_embedding"),
         ("pre_norm", "scale"): v("ln_pre.weight"), ("pre_norm", "bias"): v("ln_pre.bias")}

  def layer(i):
    g = lambda k, **kw: v(f"transformer.resblocks.{i}.{k}", **kw)
    vals = {("norm1", "scale"): g("ln_1.weight"), ("norm1", "bias"): g("ln_1.bias"),
            ("norm2", "scale"): g("ln_2.weight"), ("norm2", "bias"): g("ln_2.bias"),
            ("fc1", "kernel"): g("mlp.c_fc.weight", perm=(1, 0)), ("fc1", "bias"): g("mlp.c_fc.bias"),
            ("fc2", "kernel"): g("mlp.c_proj.weight", perm=(1, 0)), ("fc2", "bias"): g("mlp.c_proj.bias"),
            ("attn", "o"): g("attn.out_proj.weight", perm=(1, 0), split=(0, (heads, hd))),
            ("attn", "o_bias"): g("attn.out_proj.bias")}
    for part, n in enumerate("qkv"):
      vals[("attn", n)] = g("attn.in_proj_weight", chunk=(0, part, 3), perm=(1, 0), split=(1, (heads, hd)))
      vals[("attn", f"{n}_bias")] = g("attn.in_proj_bias", chunk=(0, part, 3), split=(0, (heads, hd)))
    return vals

  out.update(hf_import._stack_layers(cfg.depth, layer, ("blocks",)))
  hf_import.check_unused(store, hf_import.used_tensors(out), UNUSED, "open_clip vision import")
  return out
