"""Hugging Face checkpoints -> model parameters (CLIP vision tower; Llama / Qwen2 / Mixtral / Qwen2-MoE decoders).

Tensors come from a tensor store: `DictStore` (a state dict of arrays, e.g. torch's as numpy) or `SafetensorsStore`
(a directory of .safetensors files, read lazily block by block). The mapping (`clip_vision_sources`,
`decoder_sources`) gives, for every target parameter path, a `Source` that reads any rectangular block of the target
array: transposes, head splits, layer and expert stacking happen on the block, so a sharded import reads each
device's shard on its own (convert/convert_hf.py). `load_clip_vision` / `load_hf_decoder` fill a live module.

MoE layouts: Mixtral on disk (`block_sparse_moe.experts.{e}.w1/w2/w3`), Qwen2-MoE on disk
(`mlp.experts.{e}.gate_proj/up_proj/down_proj`), and the fused in-memory one of recent transformers
(`mlp.experts.gate_up_proj` [E, 2F, d], `mlp.experts.down_proj` [E, d, F]); router `gate.weight` [E, d].
Every target parameter must be found with the expected shape, and every decoder tensor must find a place (a few
known-unused ones aside), else a KeyError / ValueError names it.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Callable, Iterable, Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors' numpy reader needs it)
import numpy as np
from flax import nnx

from mm15_jax.config import DecoderConfig, MoEConfig, RopeScaling, VisionConfig

StateDict = Mapping[str, Any]
Path = tuple  # a parameter path inside a module, e.g. ("units", "blocks", 0, "attn", "q")


# ------------------------------------------------------------------------------------------------------------------
# Tensor stores


class DictStore:
  """HF parameter name -> array (numpy, or anything indexable that np.asarray accepts)."""

  def __init__(self, tensors: StateDict):
    self._tensors = tensors

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def names(self) -> list[str]:
    return list(self._tensors)

  def _get(self, name):
    if name not in self._tensors:
      raise KeyError(f"checkpoint has no tensor {name!r}")
    return self._tensors[name]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(np.shape(self._get(name)))

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    return np.asarray(np.asarray(self._get(name))[index])


class SafetensorsStore:
  """The *.safetensors files of a directory (with or without model.safetensors.index.json; or the given `files`),
  memory-mapped.

  `read` goes through safe_open(...).get_slice: only the requested block is read from disk.
  """

  def __init__(self, directory: str, files: list[str] | None = None):
    from safetensors import safe_open
    self.directory = directory
    index = os.path.join(directory, "model.safetensors.index.json")
    if files is None and os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
      files = [os.path.join(directory, name) for name in files]
      for path in files:
        if not os.path.exists(path):
          raise FileNotFoundError(f"{index} lists {os.path.basename(path)}, which is not in {directory}")
    elif files is None:
      files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
      raise FileNotFoundError(f"no .safetensors files in {directory}")
    self._handles = {}
    for path in files:
      handle = safe_open(path, framework="numpy")
      for name in handle.keys():
        self._handles[name] = handle

  def __contains__(self, name: str) -> bool:
    return name in self._handles

  def names(self) -> list[str]:
    return list(self._handles)

  def _slice(self, name):
    if name not in self._handles:
      raise KeyError(f"checkpoint {self.directory} has no tensor {name!r}")
    return self._handles[name].get_slice(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    return np.asarray(self._slice(name)[index])


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file or of every such file in a directory, as float32 numpy arrays."""
  from safetensors import safe_open
  files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else [path]
  if not files:
    raise FileNotFoundError(f"no .safetensors files at {path}")
  out = {}
  for f in files:
    with safe_open(f, framework="numpy") as reader:
      for k in reader.keys():
        out[k] = np.asarray(reader.get_tensor(k), np.float32)
  return out


# ------------------------------------------------------------------------------------------------------------------
# Sources: one target array, readable block by block


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[int, int]]:
  out = []
  for s, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"strided block {s} is not supported")
    out.append((start, stop))
  return out


def _slices(bounds) -> tuple[slice, ...]:
  return tuple(slice(a, b) for a, b in bounds)


class View:
  """One HF tensor as a target array: optionally `chunk=(axis, part, parts)` (the part-th of `parts` equal pieces of
  an axis, e.g. gate of a fused gate_up), then transposed by `perm`, then `split=(axis, (n, m))` (axis of size n*m
  becomes two axes, e.g. [d, heads * head_dim] -> [d, heads, head_dim])."""

  def __init__(self, store, name: str, perm: tuple[int, ...] | None = None,
               split: tuple[int, tuple[int, int]] | None = None, chunk: tuple[int, int, int] | None = None):
    self.store, self.name, self.split, self.chunk = store, name, split, chunk
    shape = list(store.shape(name))
    if chunk is not None:
      axis, _, parts = chunk
      if shape[axis] % parts:
        raise ValueError(f"tensor {name!r} of shape {tuple(shape)}: axis {axis} does not split into {parts} parts")
      shape[axis] //= parts
    self.perm = tuple(perm) if perm is not None else tuple(range(len(shape)))
    shape = [shape[p] for p in self.perm]
    if split is not None:
      axis, (n, m) = split
      if shape[axis] != n * m:
        raise ValueError(f"tensor {name!r} (after transposing {tuple(shape)}): axis {axis} of size {shape[axis]} "
                         f"does not split into {n} x {m} (heads x head_dim)")
      shape[axis:axis + 1] = [n, m]
    self.shape = tuple(shape)

  def tensors(self) -> set[str]:
    return {self.name}

  def read(self, index: tuple[slice, ...]) -> np.ndarray:
    bounds = _bounds(index, self.shape)
    post = None
    if self.split is not None:  # rows [s0, e0) of the first factor cover a contiguous range of the merged axis
      axis, (_, m) = self.split
      (s0, e0), (s1, e1) = bounds[axis], bounds[axis + 1]
      bounds[axis:axis + 2] = [(s0 * m, e0 * m)]
      post = (axis, e0 - s0, m, s1, e1)
    hf = [None] * len(self.perm)
    for i, p in enumerate(self.perm):
      hf[p] = bounds[i]
    if self.chunk is not None:
      axis, part, _ = self.chunk
      size = self.store.shape(self.name)[axis] // self.chunk[2]
      hf[axis] = (hf[axis][0] + part * size, hf[axis][1] + part * size)
    x = np.transpose(self.store.read(self.name, _slices(hf)), self.perm)
    if post is not None:
      axis, rows, m, s1, e1 = post
      x = x.reshape(x.shape[:axis] + (rows, m) + x.shape[axis + 1:])
      x = x[(slice(None),) * (axis + 1) + (slice(s1, e1),)]
    return x


class Stack:
  """Sources stacked on a new leading axis (layers, experts). A part repeated (upcycled experts) is read once."""

  def __init__(self, parts: list):
    shapes = {p.shape for p in parts}
    if len(shapes) != 1:
      raise ValueError(f"tensors {sorted(set().union(*(p.tensors() for p in parts)))} do not all have one shape "
                       f"({sorted(shapes)})")
    self.parts = parts
    self.shape = (len(parts),) + parts[0].shape

  def tensors(self) -> set[str]:
    return set().union(*(p.tensors() for p in self.parts))

  def read(self, index: tuple[slice, ...]) -> np.ndarray:
    (start, stop), rest = _bounds(index[:1], self.shape[:1])[0], tuple(index[1:])
    done = {}
    for part in self.parts[start:stop]:
      if id(part) not in done:
        done[id(part)] = part.read(rest)
    return np.stack([done[id(p)] for p in self.parts[start:stop]])


class PadRows:
  """`source` extended along `axis` to `total` entries; every new entry is the mean of the existing ones."""

  def __init__(self, source, axis: int, total: int):
    if source.shape[axis] > total:
      raise ValueError(f"tensor(s) {sorted(source.tensors())} have {source.shape[axis]} rows along axis {axis}, "
                       f"more than the {total} of the model")
    self.source, self.axis = source, axis
    self.shape = source.shape[:axis] + (total,) + source.shape[axis + 1:]

  def tensors(self) -> set[str]:
    return self.source.tensors()

  def read(self, index: tuple[slice, ...]) -> np.ndarray:
    bounds = _bounds(index, self.shape)
    start, stop = bounds[self.axis]
    n = self.source.shape[self.axis]
    parts = []
    if start < n:
      bounds[self.axis] = (start, min(stop, n))
      parts.append(np.asarray(self.source.read(_slices(bounds)), np.float32))
    if stop > n:
      bounds[self.axis] = (0, n)
      mean = np.asarray(self.source.read(_slices(bounds)), np.float64).mean(self.axis, keepdims=True)
      new_shape = list(mean.shape)
      new_shape[self.axis] = stop - max(start, n)
      parts.append(np.broadcast_to(mean.astype(np.float32), new_shape))
    return np.concatenate(parts, axis=self.axis)


def _stack_layers(num: int, per_layer: Callable[[int], dict[Path, Any]], root: Path) -> dict[Path, Stack]:
  layers = [per_layer(i) for i in range(num)]
  return {root + path: Stack([l[path] for l in layers]) for path in layers[0]}


def _prefix(store, candidates: tuple[str, ...], probe: str) -> str:
  for p in candidates:
    if p + probe in store:
      return p
  raise KeyError(f"checkpoint has no {probe!r} under any of the prefixes {candidates}")


def used_tensors(sources: Mapping[Path, Any]) -> set[str]:
  return set().union(*(s.tensors() for s in sources.values())) if sources else set()


def check_unused(store, used: set[str], ignore: Iterable[str], what: str) -> None:
  """Every tensor of `store` must be used or match one of the `ignore` regexes: nothing is dropped silently."""
  patterns = [re.compile(p) for p in ignore]
  unused = sorted(n for n in store.names() if n not in used and not any(p.fullmatch(n) for p in patterns))
  if unused:
    more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
    raise ValueError(f"{what}: checkpoint tensors the model has no place for: {unused[:8]}{more}")


def check_shapes(targets: Mapping[Path, tuple[int, ...]], sources: Mapping[Path, Any], what: str,
                 allow_missing: Callable[[Path], bool] = lambda path: False) -> None:
  """Names every target parameter without a source, every source without a parameter, and every shape mismatch."""
  missing = [p for p in targets if p not in sources and not allow_missing(p)]
  extra = [p for p in sources if p not in targets]
  if missing or extra:
    raise KeyError(f"{what}: parameters without a source {missing}, sources without a parameter {extra}")
  for path, shape in targets.items():
    if path in sources and tuple(sources[path].shape) != tuple(shape):
      raise ValueError(f"{what}: {'/'.join(map(str, path))} expects shape {tuple(shape)}, checkpoint gives "
                       f"{tuple(sources[path].shape)} (from {sorted(sources[path].tensors())[:2]})")


# ------------------------------------------------------------------------------------------------------------------
# Configs


def vision_config_from_hf(c) -> VisionConfig:
  """transformers CLIPVisionConfig -> VisionConfig (feature_layer keeps its default)."""
  acts = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
  if c.hidden_act not in acts:
    raise ValueError(f"CLIP hidden_act {c.hidden_act!r} is not supported (quick_gelu, gelu)")
  return VisionConfig(image_size=c.image_size, patch_size=c.patch_size, width=c.hidden_size,
                      depth=c.num_hidden_layers, num_heads=c.num_attention_heads, mlp_dim=c.intermediate_size,
                      act=acts[c.hidden_act], layer_norm_eps=c.layer_norm_eps, pre_norm=True)


def _rope(c) -> tuple[float, RopeScaling | None]:
  """(rope_theta, the scaling of HF rope_parameters: none, linear, dynamic or llama3)."""
  params = getattr(c, "rope_parameters", None) or {}
  kind = params.get("rope_type", "default")
  theta = params.get("rope_theta", getattr(c, "rope_theta", None))
  if theta is None:
    raise ValueError("HF config has no rope_theta")
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"rope partial_rotary_factor {params['partial_rotary_factor']} is not supported (1.0 only)")
  if kind == "default":
    return float(theta), None
  if kind == "linear":
    return float(theta), RopeScaling(kind="linear", factor=float(params["factor"]))
  if kind == "dynamic":  # transformers grows theta past max_position_embeddings
    return float(theta), RopeScaling(kind="dynamic", factor=float(params["factor"]),
                                     original_max_len=int(c.max_position_embeddings))
  if kind == "llama3":
    return float(theta), RopeScaling(kind="llama3", factor=float(params["factor"]),
                                     low_freq_factor=float(params["low_freq_factor"]),
                                     high_freq_factor=float(params["high_freq_factor"]),
                                     original_max_len=int(params["original_max_position_embeddings"]))
  raise ValueError(f"rope_type {kind!r} is not supported (default, linear, dynamic, llama3)")


DECODER_TYPES = ("llama", "qwen2", "mixtral", "qwen2_moe")


def decoder_config_from_hf(c) -> DecoderConfig:
  """transformers LlamaConfig / Qwen2Config / MixtralConfig / Qwen2MoeConfig -> DecoderConfig."""
  kind = c.model_type
  if kind == "olmoe":
    raise ValueError("OLMoE applies RMSNorm to queries and keys (tensors model.layers.{i}.self_attn.q_norm.weight, "
                     "k_norm.weight) and keeps un-renormalised top-k weights; the decoder has neither")
  if kind not in DECODER_TYPES:
    raise ValueError(f"HF model_type {kind!r} is not supported ({', '.join(DECODER_TYPES)})")
  if c.hidden_act != "silu":
    raise ValueError(f"decoder hidden_act {c.hidden_act!r} is not supported (silu)")
  if getattr(c, "mlp_bias", False):
    raise ValueError("mlp_bias=True is not supported")
  if getattr(c, "use_sliding_window", False) or (kind == "mixtral" and getattr(c, "sliding_window", None)):
    raise ValueError(f"{kind} config sets a sliding attention window; the decoder attends to the whole context")
  moe = None
  if kind == "mixtral":
    moe = MoEConfig(num_experts=c.num_local_experts, top_k=c.num_experts_per_tok, every=1)
  elif kind == "qwen2_moe":
    if c.mlp_only_layers:
      raise ValueError(f"qwen2_moe mlp_only_layers={c.mlp_only_layers} is not supported (MoE every "
                       f"decoder_sparse_step-th layer only)")
    moe = MoEConfig(num_experts=c.num_experts, top_k=c.num_experts_per_tok, every=c.decoder_sparse_step,
                    ffn_dim=c.moe_intermediate_size, norm_topk=bool(c.norm_topk_prob),
                    shared_expert_dim=c.shared_expert_intermediate_size or 0)
  head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  theta, scaling = _rope(c)
  return DecoderConfig(
      vocab_size=c.vocab_size, d_model=c.hidden_size, num_layers=c.num_hidden_layers,
      num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
      head_dim=0 if head_dim == c.hidden_size // c.num_attention_heads else head_dim,
      ffn_dim=c.intermediate_size, rope_theta=theta, rope_scaling=scaling, rms_eps=c.rms_norm_eps,
      tie_embeddings=bool(c.tie_word_embeddings),
      qkv_bias=kind == "qwen2" or bool(getattr(c, "qkv_bias", False)) or bool(getattr(c, "attention_bias", False)),
      max_len=getattr(c, "max_position_embeddings", 4096), moe=moe)


# ------------------------------------------------------------------------------------------------------------------
# CLIP vision tower

# Parts of a CLIP checkpoint the encoder does not use: the post-LayerNorm and projection feed only the pooled
# class embedding; the text tower belongs to the contrastive model.
CLIP_UNUSED = (r"(vision_model\.)?post_layernorm\..*", r"(vision_model\.)?embeddings\.position_ids",
               r"text_model\..*", r"(visual|text)_projection\.weight", r"logit_scale")


def clip_vision_sources(store, cfg: VisionConfig) -> dict[Path, Any]:
  """HF CLIPVisionModel / CLIPModel tensors -> VisionTransformer parameter sources."""
  pre = _prefix(store, ("vision_model.", ""), "embeddings.class_embedding")
  heads, hd = cfg.num_heads, cfg.width // cfg.num_heads
  v = lambda name, **kw: View(store, pre + name, **kw)
  out = {("patch_kernel",): v("embeddings.patch_embedding.weight", perm=(2, 3, 1, 0)),
         ("class_embedding",): v("embeddings.class_embedding"),
         ("pos_embedding",): v("embeddings.position_embedding.weight")}
  if cfg.pre_norm:
    out[("pre_norm", "scale")] = v("pre_layrnorm.weight")
    out[("pre_norm", "bias")] = v("pre_layrnorm.bias")

  def layer(i):
    g = lambda k, **kw: v(f"encoder.layers.{i}.{k}", **kw)
    vals = {("norm1", "scale"): g("layer_norm1.weight"), ("norm1", "bias"): g("layer_norm1.bias"),
            ("norm2", "scale"): g("layer_norm2.weight"), ("norm2", "bias"): g("layer_norm2.bias"),
            ("fc1", "kernel"): g("mlp.fc1.weight", perm=(1, 0)), ("fc1", "bias"): g("mlp.fc1.bias"),
            ("fc2", "kernel"): g("mlp.fc2.weight", perm=(1, 0)), ("fc2", "bias"): g("mlp.fc2.bias"),
            ("attn", "o"): g("self_attn.out_proj.weight", perm=(1, 0), split=(0, (heads, hd))),
            ("attn", "o_bias"): g("self_attn.out_proj.bias")}
    for n in "qkv":
      vals[("attn", n)] = g(f"self_attn.{n}_proj.weight", perm=(1, 0), split=(1, (heads, hd)))
      vals[("attn", f"{n}_bias")] = g(f"self_attn.{n}_proj.bias", split=(0, (heads, hd)))
    return vals

  out.update(_stack_layers(cfg.depth, layer, ("blocks",)))
  check_unused(store, used_tensors(out), CLIP_UNUSED, "CLIP vision import")
  return out


# ------------------------------------------------------------------------------------------------------------------
# Llama-family decoders


def _dense_ffn(store, p: str) -> dict[Path, View]:
  g = lambda k: View(store, p + k, perm=(1, 0))
  return {("ffn", "gate"): g("mlp.gate_proj.weight"), ("ffn", "up"): g("mlp.up_proj.weight"),
          ("ffn", "down"): g("mlp.down_proj.weight")}


def _moe_ffn(store, p: str, num_experts: int) -> dict[Path, Any]:
  if p + "mlp.experts.gate_up_proj" in store:  # fused: [E, 2F, d] and [E, d, F]
    fused = p + "mlp.experts.gate_up_proj"
    return {("ffn", "router"): View(store, p + "mlp.gate.weight", perm=(1, 0)),
            ("ffn", "gate"): View(store, fused, chunk=(1, 0, 2), perm=(0, 2, 1)),
            ("ffn", "up"): View(store, fused, chunk=(1, 1, 2), perm=(0, 2, 1)),
            ("ffn", "down"): View(store, p + "mlp.experts.down_proj", perm=(0, 2, 1))}
  if p + "block_sparse_moe.gate.weight" in store:  # Mixtral on disk
    base, names = p + "block_sparse_moe.", {"gate": "w1", "up": "w3", "down": "w2"}
  else:  # Qwen2-MoE on disk
    base, names = p + "mlp.", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
  experts = lambda n: Stack([View(store, f"{base}experts.{e}.{names[n]}.weight", perm=(1, 0))
                             for e in range(num_experts)])
  return {("ffn", "router"): View(store, base + "gate.weight", perm=(1, 0)),
          ("ffn", "gate"): experts("gate"), ("ffn", "up"): experts("up"), ("ffn", "down"): experts("down")}


def _shared_expert(store, p: str) -> dict[Path, View]:
  """Qwen2-MoE's sigmoid-gated shared expert of layer prefix `p`."""
  g = lambda k: View(store, f"{p}mlp.shared_expert.{k}.weight", perm=(1, 0))
  return {("ffn", "shared", "ffn", "gate"): g("gate_proj"), ("ffn", "shared", "ffn", "up"): g("up_proj"),
          ("ffn", "shared", "ffn", "down"): g("down_proj"),
          ("ffn", "shared", "gate"): View(store, f"{p}mlp.shared_expert_gate.weight", perm=(1, 0))}


def _empty_shared_expert(store, p: str) -> list[str]:
  """Tensors of a zero-width shared expert (shared_expert_intermediate_size 0): skipped, their output is zero."""
  names = [f"{p}mlp.shared_expert.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
  return [n for n in names + [f"{p}mlp.shared_expert_gate.weight"] if n in store]


def decoder_sources(store, cfg: DecoderConfig, *, upcycle: bool = False) -> dict[Path, Any]:
  """HF LlamaForCausalLM / Qwen2ForCausalLM / MixtralForCausalLM / Qwen2MoeForCausalLM tensors -> Decoder sources.

  cfg: the target decoder. Its vocab_size may exceed the checkpoint's rows: new embedding rows (and LM head columns)
  are the mean of the existing ones. upcycle: `cfg` has MoE and the checkpoint is dense; every expert of a MoE layer
  reads that layer's dense FFN, and the routers get no source (the caller initialises them).
  """
  every = cfg.moe.every if cfg.moe is not None else 1
  d, heads, kv = cfg.d_model, cfg.num_heads, cfg.num_kv_heads
  hd = cfg.head_dim or d // heads
  out: dict[Path, Any] = {
      ("embedding",): View(store, "model.embed_tokens.weight"),
      ("final_norm", "scale"): View(store, "model.norm.weight")}
  if not cfg.tie_embeddings:
    out[("lm_head",)] = View(store, "lm_head.weight", perm=(1, 0))
  if out[("embedding",)].shape[0] != cfg.vocab_size:
    out[("embedding",)] = PadRows(out[("embedding",)], 0, cfg.vocab_size)
    if not cfg.tie_embeddings:
      out[("lm_head",)] = PadRows(out[("lm_head",)], 1, cfg.vocab_size)
  ignored: list[str] = []

  def unit(u):
    vals = {}
    for j in range(every):
      p = f"model.layers.{u * every + j}."
      g = lambda k, **kw: View(store, p + k, **kw)
      block = {("attn_norm", "scale"): g("input_layernorm.weight"),
               ("ffn_norm", "scale"): g("post_attention_layernorm.weight"),
               ("attn", "q"): g("self_attn.q_proj.weight", perm=(1, 0), split=(1, (heads, hd))),
               ("attn", "k"): g("self_attn.k_proj.weight", perm=(1, 0), split=(1, (kv, hd))),
               ("attn", "v"): g("self_attn.v_proj.weight", perm=(1, 0), split=(1, (kv, hd))),
               ("attn", "o"): g("self_attn.o_proj.weight", perm=(1, 0), split=(0, (heads, hd)))}
      if cfg.qkv_bias:
        for n, h in (("q", heads), ("k", kv), ("v", kv)):
          block[("attn", f"{n}_bias")] = g(f"self_attn.{n}_proj.bias", split=(0, (h, hd)))
      use_moe = cfg.moe is not None and j == every - 1
      if use_moe and upcycle:
        block.update({k: Stack([v] * cfg.moe.num_experts) for k, v in _dense_ffn(store, p).items()})
      elif use_moe:
        block.update(_moe_ffn(store, p, cfg.moe.num_experts))
        if cfg.moe.shared_expert_dim:
          block.update(_shared_expert(store, p))
        else:
          ignored.extend(_empty_shared_expert(store, p))
      else:
        block.update(_dense_ffn(store, p))
      vals.update({(j,) + k: v for k, v in block.items()})
    return vals

  out.update(_stack_layers(cfg.num_layers // every, unit, ("units", "blocks")))
  unused_ok = [r".*\.rotary_emb\.inv_freq"] + [re.escape(n) for n in ignored]
  if cfg.tie_embeddings:
    unused_ok.append(r"lm_head\.weight")  # a tied checkpoint may still store the (ignored) head
  check_unused(store, used_tensors(out), unused_ok, "HF decoder import")
  return out


# ------------------------------------------------------------------------------------------------------------------
# Writing into a live module


def _assign(module: nnx.Module, sources: Mapping[Path, Any], what: str) -> None:
  """Sets every Param of `module` from its source, checking names and shapes."""
  state = nnx.state(module, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  check_shapes({p: tuple(v.shape) for p, v in flat.items()}, sources, what)
  for path, var in flat.items():
    full = tuple(slice(None) for _ in var.shape)
    var.set_value(np.asarray(sources[path].read(full), var.get_value().dtype))
  nnx.update(module, state)


def load_clip_vision(vision, sd: StateDict) -> None:
  """HF CLIPVisionModel / CLIPModel weights -> VisionTransformer (post_layernorm and projection are unused)."""
  width = vision.class_embedding.shape[0]
  cfg = VisionConfig(width=width, depth=vision.depth, num_heads=vision.blocks.attn.q.shape[2],
                     pre_norm=vision.pre_norm is not None)
  _assign(vision, clip_vision_sources(DictStore(sd), cfg), "CLIP vision import")


def decoder_layout(decoder) -> DecoderConfig:
  """The DecoderConfig fields the mapping needs, read off a built Decoder."""
  blocks = decoder.units.blocks
  _, d, heads, hd = blocks[0].attn.q.shape
  moe = None
  if decoder.has_moe:
    ffn = blocks[-1].ffn
    moe = MoEConfig(num_experts=ffn.num_experts, top_k=ffn.top_k, every=decoder.every, norm_topk=ffn.norm_topk,
                    shared_expert_dim=0 if ffn.shared is None else ffn.shared.ffn.gate.shape[-1])
  return DecoderConfig(vocab_size=decoder.embedding.shape[0], d_model=d, num_layers=decoder.num_units * decoder.every,
                       num_heads=heads, num_kv_heads=blocks[0].attn.k.shape[2], head_dim=hd,
                       tie_embeddings=decoder.lm_head is None, qkv_bias=blocks[0].attn.use_bias, moe=moe)


def load_hf_decoder(decoder, sd: StateDict) -> None:
  """HF LlamaForCausalLM / Qwen2ForCausalLM / MixtralForCausalLM / Qwen2MoeForCausalLM weights -> Decoder."""
  _assign(decoder, decoder_sources(DictStore(sd), decoder_layout(decoder)), "HF decoder import")
