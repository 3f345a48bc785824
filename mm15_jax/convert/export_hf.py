"""`mm15 export-hf`: a checkpoint as Hugging Face checkpoints.

    mm15 export-hf --checkpoint runs/x/sft/checkpoints --tokenizer data/tokenizer.model --out hf/mm15

`<out>/`: the whole model for `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`: config.json
(model_type mm15, auto_map), model.safetensors and modeling_mm15.py (a CLIPVisionModel, the C-Abstractor in torch and
the decoder below; `input_ids` with the tokenizer's image placeholders and `pixel_values` of the prompt's tiles).
Its processor, `AutoProcessor.from_pretrained(out, trust_remote_code=True)`: processing_mm15.py, which turns PIL images
and a prompt into those inputs as the checkpoint's stage does (its image splitting, tile size and markers, saved in
processor_config.json; a checkpoint without a stage, e.g. from `mm15 convert-hf`, leaves images unsplit), and the
LLM's tokenizer files in `<out>/tokenizer/`.
`<out>/decoder/`: the decoder alone, a standard checkpoint (no remote code),
config.json + model.safetensors that `transformers.AutoModelForCausalLM.from_pretrained` loads: a
LlamaForCausalLM (dense, no q/k/v biases), Qwen2ForCausalLM (dense with biases), MixtralForCausalLM (an MoE FFN in
every layer, renormalised top-k, no shared expert or biases) or Qwen2MoeForCausalLM (any other MoE layout). Every
tensor is the exact inverse of the import mapping of convert/hf_import.py (the same Views, read backwards), so an
export re-imports to the same parameters. The vocabulary is the model's (the LLM's ids, then the project's special
tokens and padding rows). The vision tower maps onto a CLIPVisionModel the same way (the CLIP import read backwards).
"""
from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from mm15_jax import config as config_lib
from mm15_jax.config import DecoderConfig, ModelConfig, SplitConfig, VisionConfig
from mm15_jax.convert import hf_import


def architecture(cfg: DecoderConfig) -> str:
  """The transformers model_type that computes exactly what `cfg` computes."""
  moe = cfg.moe
  if moe is None:
    return "qwen2" if cfg.qkv_bias else "llama"
  if moe.every == 1 and not moe.shared_expert_dim and moe.norm_topk and not cfg.qkv_bias:
    return "mixtral"
  return "qwen2_moe"


def _rope(cfg: DecoderConfig) -> tuple[dict, int]:
  """(HF rope_parameters, max_position_embeddings)."""
  s = cfg.rope_scaling
  params = {"rope_type": "default" if s is None else s.kind, "rope_theta": cfg.rope_theta}
  max_len = cfg.max_len
  if s is not None and s.kind == "dynamic":  # transformers grows theta past max_position_embeddings
    params["factor"], max_len = s.factor, s.original_max_len
  elif s is not None and s.kind == "linear":
    params["factor"] = s.factor
  elif s is not None:
    params.update(factor=s.factor, low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                  original_max_position_embeddings=s.original_max_len)
    max_len = max(max_len, s.original_max_len + 1)
  return params, max_len


def hf_config(cfg: DecoderConfig):
  """The transformers config of the exported decoder."""
  import transformers
  kind = architecture(cfg)
  rope, max_len = _rope(cfg)
  head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
  common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=head_dim,
                rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=max_len,
                rope_parameters=rope, hidden_act="silu")
  moe = cfg.moe
  if kind == "llama":
    return transformers.LlamaConfig(intermediate_size=cfg.ffn_dim, attention_bias=False, mlp_bias=False, **common)
  if kind == "qwen2":
    return transformers.Qwen2Config(intermediate_size=cfg.ffn_dim, use_sliding_window=False, **common)
  if kind == "mixtral":
    return transformers.MixtralConfig(intermediate_size=moe.ffn_dim or cfg.ffn_dim, num_local_experts=moe.num_experts,
                                      num_experts_per_tok=moe.top_k, sliding_window=None, **common)
  return transformers.Qwen2MoeConfig(
      intermediate_size=cfg.ffn_dim, moe_intermediate_size=moe.ffn_dim or cfg.ffn_dim, num_experts=moe.num_experts,
      num_experts_per_tok=moe.top_k, decoder_sparse_step=moe.every, mlp_only_layers=[],
      norm_topk_prob=moe.norm_topk, shared_expert_intermediate_size=moe.shared_expert_dim,
      qkv_bias=cfg.qkv_bias, use_sliding_window=False, **common)


def tensor_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
  """Names and shapes of the checkpoint's tensors (the on-disk layout transformers writes)."""
  kind = architecture(cfg)
  d, v, hd = cfg.d_model, cfg.vocab_size, cfg.head_dim or cfg.d_model // cfg.num_heads
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (v, d)
  every = cfg.moe.every if cfg.moe is not None else 1
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q)})
    if cfg.qkv_bias:
      shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                     p + "self_attn.v_proj.bias": (kv,)})
    if cfg.moe is None or i % every != every - 1:
      f = cfg.ffn_dim
      shapes.update({p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                     p + "mlp.down_proj.weight": (d, f)})
      continue
    e, f = cfg.moe.num_experts, cfg.moe.ffn_dim or cfg.ffn_dim
    if kind == "mixtral":
      base, names = p + "block_sparse_moe.", ("w1", "w3", "w2")
    else:
      base, names = p + "mlp.", ("gate_proj", "up_proj", "down_proj")
      s = cfg.moe.shared_expert_dim  # zero-width when there is none (the layout still has the tensors)
      shapes.update({base + "shared_expert.gate_proj.weight": (s, d), base + "shared_expert.up_proj.weight": (s, d),
                     base + "shared_expert.down_proj.weight": (d, s), base + "shared_expert_gate.weight": (1, d)})
    shapes[base + "gate.weight"] = (e, d)
    for x in range(e):
      shapes.update({f"{base}experts.{x}.{names[0]}.weight": (f, d), f"{base}experts.{x}.{names[1]}.weight": (f, d),
                     f"{base}experts.{x}.{names[2]}.weight": (d, f)})
  return shapes


class _Shapes:
  """A tensor store that only knows names and shapes: the import mapping is built on it, then read backwards."""

  def __init__(self, shapes: dict[str, tuple[int, ...]]):
    self._shapes = shapes

  def __contains__(self, name: str) -> bool:
    return name in self._shapes

  def names(self) -> list[str]:
    return list(self._shapes)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._shapes[name]


def _invert(source, value: np.ndarray, out: dict[str, np.ndarray]) -> None:
  """Writes the HF tensor(s) a source would read `value` from."""
  if isinstance(source, hf_import.Stack):
    for part, v in zip(source.parts, value):
      _invert(part, v, out)
    return
  if not isinstance(source, hf_import.View) or source.chunk is not None:
    raise TypeError(f"export of {type(source).__name__} sources is not defined")
  x = value
  if source.split is not None:
    axis = source.split[0]
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
  out[source.name] = np.ascontiguousarray(np.transpose(x, np.argsort(source.perm)))


def _invert_all(sources: dict, params: dict[str, Any], what: str) -> dict[str, np.ndarray]:
  flat = {tuple(k): np.asarray(jax.device_get(v), np.float32) for k, v in _flatten(params)}
  hf_import.check_shapes({p: a.shape for p, a in flat.items()}, sources, what)
  out: dict[str, np.ndarray] = {}
  for path, source in sources.items():
    _invert(source, flat[path], out)
  return out


def decoder_tensors(cfg: DecoderConfig, params: dict[str, Any]) -> dict[str, np.ndarray]:
  """The decoder's parameters (a pure dict of arrays, as nnx.to_pure_dict gives) as HF tensors, float32."""
  shapes = tensor_shapes(cfg)
  out = _invert_all(hf_import.decoder_sources(_Shapes(shapes), cfg), params, "HF export")
  for name in set(shapes) - set(out):  # a zero-width shared expert: zeros change nothing
    if "shared_expert" not in name:
      raise KeyError(f"HF export: no parameter maps to {name}")
    out[name] = np.zeros(shapes[name], np.float32)
  return out


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def vision_tensors(cfg: VisionConfig, params: dict[str, Any]) -> dict[str, np.ndarray]:
  """The ViT's parameters as CLIPVisionModel tensors (its unused post-LayerNorm as the identity's ones and zeros)."""
  if not cfg.pre_norm:
    raise ValueError("model.vision.pre_norm=False has no CLIPVisionModel counterpart (CLIP normalises the embeddings)")
  w, p, side = cfg.width, cfg.patch_size, cfg.image_size // cfg.patch_size
  pre = "vision_model."
  shapes = {pre + "embeddings.class_embedding": (w,), pre + "embeddings.patch_embedding.weight": (w, 3, p, p),
            pre + "embeddings.position_embedding.weight": (side * side + 1, w), pre + "pre_layrnorm.weight": (w,),
            pre + "pre_layrnorm.bias": (w,)}
  for i in range(cfg.depth):
    g = f"{pre}encoder.layers.{i}."
    for n in ("q", "k", "v", "out"):
      shapes.update({g + f"self_attn.{n}_proj.weight": (w, w), g + f"self_attn.{n}_proj.bias": (w,)})
    shapes.update({g + "mlp.fc1.weight": (cfg.mlp_dim, w), g + "mlp.fc1.bias": (cfg.mlp_dim,),
                   g + "mlp.fc2.weight": (w, cfg.mlp_dim), g + "mlp.fc2.bias": (w,)})
    for n in ("layer_norm1", "layer_norm2"):
      shapes.update({g + f"{n}.weight": (w,), g + f"{n}.bias": (w,)})
  out = _invert_all(hf_import.clip_vision_sources(_Shapes(shapes), cfg), params, "HF export (vision)")
  out.update({pre + "post_layernorm.weight": np.ones((w,), np.float32),
              pre + "post_layernorm.bias": np.zeros((w,), np.float32)})
  return out


def connector_tensors(params: dict[str, Any]) -> dict[str, np.ndarray]:
  """The C-Abstractor's parameters under modeling_mm15.CAbstractor's names (conv kernels as torch lays them out)."""
  a = lambda x: np.asarray(jax.device_get(x), np.float32)
  conv1x1 = lambda kernel: np.ascontiguousarray(a(kernel).T[:, :, None, None])
  out = {"pos_emb": a(params["pos_embedding"])[None]}

  def conv_norm(name, src):
    out.update({f"{name}.conv.weight": conv1x1(src["kernel"]), f"{name}.bn.weight": a(src["norm"]["scale"]),
                f"{name}.bn.bias": a(src["norm"]["bias"])})

  for index, stage in ((0, "stage1"), (2, "stage2")):
    blocks = params[stage]["blocks"]
    for i in sorted(blocks):
      b, name = blocks[i], f"net.{index}.blocks.{i}"
      conv_norm(f"{name}.conv1", b["conv1"])
      out.update({f"{name}.conv2.conv.weight": np.ascontiguousarray(a(b["dw_kernel"]).transpose(3, 2, 0, 1)),
                  f"{name}.conv2.bn.weight": a(b["dw_norm"]["scale"]),
                  f"{name}.conv2.bn.bias": a(b["dw_norm"]["bias"])})
      for src, dst in (("se_reduce", "fc1"), ("se_expand", "fc2")):
        if src in b:
          out.update({f"{name}.se.{dst}.weight": conv1x1(b[src]["kernel"]), f"{name}.se.{dst}.bias": a(b[src]["bias"])})
      conv_norm(f"{name}.conv3", b["conv3"])
      if b.get("shortcut") is not None:
        conv_norm(f"{name}.downsample", b["shortcut"])
  for src, dst in (("readout1", "0"), ("readout2", "2")):
    out.update({f"readout.{dst}.weight": np.ascontiguousarray(a(params[src]["kernel"]).T),
                f"readout.{dst}.bias": a(params[src]["bias"])})
  return out


def multimodal_config(cfg: ModelConfig, image_token_id: int) -> dict:
  """config.json of the remote-code model."""
  v = cfg.vision
  vision = {"hidden_size": v.width, "intermediate_size": v.mlp_dim, "num_hidden_layers": v.depth,
            "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
            "hidden_act": v.act, "layer_norm_eps": v.layer_norm_eps, "num_channels": 3}
  c = cfg.connector
  return {"model_type": "mm15", "architectures": ["Mm15ForConditionalGeneration"],
          "auto_map": {"AutoConfig": "modeling_mm15.Mm15Config",
                       "AutoModelForCausalLM": "modeling_mm15.Mm15ForConditionalGeneration",
                       "AutoProcessor": "processing_mm15.Mm15Processor"},
          "vision_config": vision, "text_config": hf_config(cfg.decoder).to_dict(),
          "connector_hidden": c.hidden, "connector_depth": c.depth, "pooled_side": c.pooled_side,
          "se_ratio": c.se_ratio, "feature_layer": v.feature_layer, "image_token_id": image_token_id,
          "center_tokens": c.center_tokens}


def processor_config(cfg: ModelConfig, tokenizer, split: SplitConfig) -> dict:
  """processor_config.json: how processing_mm15.py splits images and which ids the project's tokens have."""
  from mm15_jax.data import images
  images.check_split_config(split)
  keys = ("mode", "n_min", "n_max", "static_grid", "overview", "overview_first", "tile_markers", "max_images_to_split")
  return {"auto_map": {"AutoProcessor": "processing_mm15.Mm15Processor"},
          "tile_size": cfg.vision.image_size, "tokens_per_tile": cfg.tokens_per_tile,
          "split": {k: getattr(split, k) for k in keys},
          "trained_resample": split.resample,  # the processor resizes as "antialias" does
          "special_tokens": tokenizer.special_tokens, "base_vocab_size": tokenizer.base_vocab_size,
          "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "end_id": tokenizer.end_id,
          "pad_id": tokenizer.pad_id, "chat_template": tokenizer.chat_template}


def write(cfg: ModelConfig, params: dict[str, Any], out_dir: str, *, tokenizer, split: SplitConfig) -> dict:
  """Writes `<out_dir>` (the whole model and its processor, remote code; the images split as `split` says) and
  `<out_dir>/decoder` (standard); returns a summary. `tokenizer`: the data.tokenizer.Tokenizer it was trained with."""
  from safetensors.numpy import save
  out = epath.Path(out_dir)
  if (out / "model.safetensors").exists():
    raise FileExistsError(f"{out_dir} already holds model.safetensors; choose a new --out")
  processor = processor_config(cfg, tokenizer, split)  # a bad split setting stops before anything is written
  decoder = decoder_tensors(cfg.decoder, params["decoder"])
  tensors = {"vision_tower." + k: v for k, v in vision_tensors(cfg.vision, params["vision"]).items()}
  tensors.update({"connector." + k: v for k, v in connector_tensors(params["connector"]).items()})
  tensors.update({"language_model." + k: v for k, v in decoder.items()})
  (out / "decoder").mkdir(parents=True, exist_ok=True)
  config = hf_config(cfg.decoder)
  config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
  (out / "decoder" / "config.json").write_text(config.to_json_string())
  (out / "decoder" / "model.safetensors").write_bytes(save(decoder, metadata={"format": "pt"}))
  (out / "config.json").write_text(json.dumps(multimodal_config(cfg, tokenizer.image_id), indent=2))
  (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
  (out / "tokenizer").mkdir(exist_ok=True)
  for name, data in tokenizer.files.items():  # the LLM's files: its ids and template, as the model was trained
    (out / "tokenizer" / name).write_bytes(data)
  for code in ("modeling_mm15.py", "processing_mm15.py"):
    (out / code).write_text(epath.Path(__file__).with_name(code).read_text())
  (out / "model.safetensors").write_bytes(save(tensors, metadata={"format": "pt"}))
  return {"out": str(out), "decoder_architecture": config.architectures[0],
          "parameters_M": round(sum(t.size for t in tensors.values()) / 1e6, 1),
          "processor": {"split": split.mode, "tile_size": processor["tile_size"]}}


def stage_split(meta: dict) -> SplitConfig:
  """The image splitting of the stage that wrote a checkpoint (its meta); unsplit when it names no stage."""
  stage = meta.get("stage")
  return config_lib.from_dict(SplitConfig, stage["data"]["split"]) if stage else SplitConfig(mode="none")


def export(checkpoint_dir: str, out_dir: str, tokenizer: str) -> dict:
  """Restores the checkpoint's parameters onto this host and writes both exports."""
  from mm15_jax import sharding
  from mm15_jax.config import MeshConfig
  from mm15_jax.data.tokenizer import Tokenizer
  from mm15_jax.train import checkpoint as ckpt_lib
  from mm15_jax.train import state as state_lib
  tok = Tokenizer(tokenizer)
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1))
  split = stage_split(ckpt_lib.read_meta(checkpoint_dir))  # every step of a stage's folder has its stage
  model_cfg, _, params, _ = state_lib.restore_model_params(checkpoint_dir, mesh)
  return write(model_cfg, nnx.to_pure_dict(params), out_dir, tokenizer=tok, split=split)


def command(a) -> None:
  """`mm15 export-hf` with its parsed flags."""
  print(json.dumps(export(a.checkpoint, a.out, a.tokenizer), indent=2))
