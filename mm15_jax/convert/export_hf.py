"""`mm15 export-hf`: a checkpoint's decoder as a standard Hugging Face checkpoint (no remote code).

    mm15 export-hf --checkpoint runs/x/sft/checkpoints --out hf/mm15-decoder

Writes config.json + model.safetensors that `transformers.AutoModelForCausalLM.from_pretrained` loads: a
LlamaForCausalLM (dense, no q/k/v biases), Qwen2ForCausalLM (dense with biases), MixtralForCausalLM (an MoE FFN in
every layer, renormalised top-k, no shared expert or biases) or Qwen2MoeForCausalLM (any other MoE layout). Every
tensor is the exact inverse of the import mapping of convert/hf_import.py (the same Views, read backwards), so an
export re-imports to the same parameters. The vocabulary is the model's (the LLM's ids, then the project's special
tokens and padding rows). The vision tower and connector are not part of this export.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from mm15_jax.config import DecoderConfig
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


def decoder_tensors(cfg: DecoderConfig, params: dict[str, Any]) -> dict[str, np.ndarray]:
  """The decoder's parameters (a pure dict of arrays, as nnx.to_pure_dict gives) as HF tensors, float32."""
  shapes = tensor_shapes(cfg)
  sources = hf_import.decoder_sources(_Shapes(shapes), cfg)
  flat = {tuple(k): np.asarray(jax.device_get(v), np.float32) for k, v in _flatten(params)}
  hf_import.check_shapes({p: a.shape for p, a in flat.items()}, sources, "HF export")
  out: dict[str, np.ndarray] = {}
  for path, source in sources.items():
    _invert(source, flat[path], out)
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


def export_decoder(checkpoint_dir: str, out_dir: str) -> dict:
  """Restores the checkpoint's parameters onto this host and writes the decoder; returns what was written."""
  from safetensors.numpy import save_file

  from mm15_jax import sharding
  from mm15_jax.config import MeshConfig
  from mm15_jax.train import state as state_lib
  if os.path.exists(os.path.join(out_dir, "model.safetensors")):
    raise FileExistsError(f"{out_dir} already holds model.safetensors; choose a new --out")
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1))
  model_cfg, _, params, _ = state_lib.restore_model_params(checkpoint_dir, mesh)
  decoder = nnx.to_pure_dict(params)["decoder"]
  tensors = decoder_tensors(model_cfg.decoder, decoder)
  config = hf_config(model_cfg.decoder)
  config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
  os.makedirs(out_dir, exist_ok=True)
  config.save_pretrained(out_dir)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  return {"out": os.path.abspath(out_dir), "architecture": config.architectures[0],
          "parameters_M": round(sum(t.size for t in tensors.values()) / 1e6, 1)}


def command(a) -> None:
  """`mm15 export-hf` with its parsed flags."""
  print(json.dumps(export_decoder(a.checkpoint, a.out), indent=2))
