"""`mm15 convert-hf`: a Hugging Face CLIP vision tower and LLM -> a checkpoint a stage initialises from.

    mm15 convert-hf --vision hf/DFN5B-CLIP-ViT-H-14-378 --decoder hf/Qwen2-1.5B --out ckpt/hf-init \
        [--connector-hidden 1024 --connector-depth 3 --pooled-side 12] [--vocab-size N | --tokenizer FILE] \
        [--upcycle --moe-experts 64 --moe-top-k 2 --moe-every 2] [--fsdp -1 --tensor 1 --expert 1]
    # then: stages.pretrain.init_from=ckpt/hf-init

Inputs are directories in HF layout (config.json + *.safetensors, with or without model.safetensors.index.json):
a CLIPVisionModel or full CLIPModel (vision_model.* prefix), or an open_clip directory (open_clip_config.json +
open_clip_model.safetensors / open_clip_pytorch_model.bin, convert/open_clip.py); and a Llama (Llama 3 RoPE scaling
included), Qwen2, Mixtral or Qwen2-MoE (shared expert included) decoder. Either may be left out (`--model PRESET`
then gives that part's shape and it is initialised at random).
Output: `<out>/0/{params, meta}` in the layout of train/checkpoint.py, meta = {"model": ModelConfig as dict,
"step": 0, "source": {...}}.

Sharded: the parameters are created directly on a mesh (abstract shapes, shardings from the logical axis names) and
every device's shard is read from the safetensors files on its own (safe_open(...).get_slice through
jax.make_array_from_callback), so no host ever holds the whole model; at most the addressable part of one parameter
is on the host at a time. train/checkpoint.py writes the checkpoint from those sharded arrays.

Not in the HF checkpoints, so freshly initialised (seed): the connector (as a new CAbstractor) and, when upcycling,
the routers (the MoE layer's initialiser).

Vocabulary: the project's tokenizer appends its special tokens after the LLM's vocabulary and rounds up to a multiple
of 128, so the embedding (and untied LM head) get `vocab_size` rows (default: the HF vocabulary rounded up to 128; or
the size of `--tokenizer`). Each new row is the mean of the checkpoint's rows (embedding and LM head separately): a new
token starts as the "average" token, inside the distribution of real embeddings, and with the average output logit,
so the model's next-token distribution over the original vocabulary barely moves before training.

Upcycling (`--upcycle`): a dense decoder becomes a MoE one with an MoE FFN in every `--moe-every`-th layer whose
experts are all copies of that layer's dense FFN. Top-k weights sum to one, so at initialisation the MoE model
computes exactly the dense one whatever the router says.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mm15_jax import config as config_lib
from mm15_jax import paths, sharding
from mm15_jax.config import ConnectorConfig, MeshConfig, ModelConfig, MoEConfig, VisionConfig
from mm15_jax.convert import hf_import, open_clip
from mm15_jax.models import layers
from mm15_jax.models.connector import CAbstractor
from mm15_jax.models.multimodal import MultimodalModel
from mm15_jax.train import checkpoint
from mm15_jax.train import state as state_lib

NEW_ROWS = "mean of the checkpoint's rows (embedding and LM head separately)"


def read_hf_config(directory: str, *, vision: bool):
  """config.json of an HF model directory as a transformers config (a CLIPModel gives its vision_config)."""
  if not os.path.exists(os.path.join(directory, "config.json")):
    raise FileNotFoundError(f"{directory} has no config.json (expected a Hugging Face model directory)")
  try:
    import transformers
  except ImportError as e:
    raise ImportError("mm15 convert-hf reads HF configs with `transformers` (pip install transformers)") from e
  cfg = transformers.AutoConfig.from_pretrained(directory)
  if vision:
    if cfg.model_type == "clip":
      cfg = cfg.vision_config
    if cfg.model_type != "clip_vision_model":
      raise ValueError(f"{directory}/config.json: model_type {cfg.model_type!r} is not a CLIP model "
                       f"(clip, clip_vision_model)")
  return cfg


def resolve_vocab_size(hf_vocab: int, vocab_size: int = 0, tokenizer: str = "") -> int:
  """Rows of the converted embedding: explicit, or the larger of the tokenizer's and the HF vocabulary rounded up to
  128 (an LLM's embedding often has spare rows past its tokenizer: the project's specials may sit there)."""
  if vocab_size and tokenizer:
    raise ValueError("give --vocab-size or --tokenizer, not both")
  rounded = -(-hf_vocab // 128) * 128
  if tokenizer:
    from mm15_jax.data.tokenizer import Tokenizer
    tok = Tokenizer(tokenizer)
    if tok.base_vocab_size > hf_vocab:
      raise ValueError(f"tokenizer {tokenizer} has {tok.base_vocab_size} tokens, more than the decoder's {hf_vocab} "
                       f"embedding rows: it is not this LLM's tokenizer")
    vocab_size = max(tok.vocab_size, rounded)
  vocab_size = vocab_size or rounded
  if vocab_size < hf_vocab:
    raise ValueError(f"--vocab-size {vocab_size} is smaller than the decoder's vocabulary ({hf_vocab})")
  return vocab_size


def read_vision_config(directory: str) -> VisionConfig:
  """The ViT of an HF CLIP directory (config.json) or an open_clip one (open_clip_config.json)."""
  if open_clip.is_open_clip(directory):
    return open_clip.vision_config(directory)
  return hf_import.vision_config_from_hf(read_hf_config(directory, vision=True))


def open_vision_store(directory: str):
  return open_clip.open_store(directory) if open_clip.is_open_clip(directory) else hf_import.SafetensorsStore(directory)


def model_config(vision: VisionConfig | None, decoder_hf, *, connector: ConnectorConfig, vocab_size: int = 0,
                 tokenizer: str = "", upcycle: MoEConfig | None = None, feature_layer: int = -1,
                 base: ModelConfig | None = None) -> tuple[ModelConfig, int]:
  """(ModelConfig of the converted model, the HF vocabulary size; 0 without an HF decoder). A part without a
  checkpoint (vision or decoder_hf None) takes its config from `base` and is initialised at random."""
  if (vision is None or decoder_hf is None) and base is None:
    raise ValueError("a vision-only or decoder-only import takes the other part's shape from --model PRESET")
  vision = dataclasses.replace(vision if vision is not None else base.vision, feature_layer=feature_layer)
  if decoder_hf is None:
    if upcycle is not None or tokenizer:
      raise ValueError("--upcycle and --tokenizer apply to an imported decoder (--decoder)")
    decoder = dataclasses.replace(base.decoder, vocab_size=vocab_size or base.decoder.vocab_size)
    return ModelConfig(vision=vision, connector=connector, decoder=decoder), 0
  decoder = hf_import.decoder_config_from_hf(decoder_hf)
  hf_vocab = decoder.vocab_size
  decoder.vocab_size = resolve_vocab_size(hf_vocab, vocab_size, tokenizer)
  if upcycle is not None:
    if decoder.moe is not None:
      raise ValueError(f"--upcycle needs a dense decoder; {decoder_hf.model_type} already has experts")
    if upcycle.ffn_dim not in (0, decoder.ffn_dim):
      raise ValueError(f"upcycled experts copy the dense FFN (ffn_dim {decoder.ffn_dim}), not {upcycle.ffn_dim}")
    if decoder.num_layers % upcycle.every:
      raise ValueError(f"--moe-every {upcycle.every} does not divide the {decoder.num_layers} decoder layers")
    decoder.moe = upcycle
  return ModelConfig(vision=vision, connector=connector, decoder=decoder), hf_vocab


def _fresh_params(cfg: ModelConfig, targets: dict, shardings: dict, seed: int) -> dict[tuple, jax.Array]:
  """Parameters no checkpoint has, built in their shards: the connector as a fresh CAbstractor initialises it,
  (upcycling) the routers with the MoE layer's initialiser (normal, std 1/sqrt(d_model)), and a vision tower or
  decoder without a checkpoint as the model initialises it."""
  paths = list(targets)
  whole_parts = {p[0] for p in paths if p[0] in ("vision", "decoder") and p[-2:] != ("ffn", "router")}

  def init():
    connector = CAbstractor(cfg.connector, in_dim=cfg.vision.width, out_dim=cfg.decoder.d_model,
                            grid_side=cfg.vision.image_size // cfg.vision.patch_size, dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, rngs=nnx.Rngs(seed))
    fresh = {("connector",) + p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(connector, nnx.Param))}
    if whole_parts:  # unused parts of the model are dropped by the compiler
      model = MultimodalModel(cfg, rngs=nnx.Rngs(seed))
      fresh.update({p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                    if p[0] in whole_parts})
    router_init = layers.fan_in_init(cfg.decoder.d_model)
    for i, path in enumerate(paths):
      if path not in fresh:  # a router [units, d_model, experts]
        key = jax.random.fold_in(jax.random.key(seed), i)
        fresh[path] = router_init(key, tuple(targets[path].shape), targets[path].dtype)
    return [fresh[p] for p in paths]

  # Runs once: on CPU, LLVM's optimisation passes would cost more than they save.
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  with sharding.use_mesh(shardings[paths[0]].mesh):
    values = jax.jit(init, out_shardings=[shardings[p] for p in paths], compiler_options=options)()
  return dict(zip(paths, values))


def _read_sharded(source, shape, dtype, named_sharding) -> jax.Array:
  """One parameter, each device's block read from its source on its own (replicated blocks read once)."""
  blocks: dict[tuple, np.ndarray] = {}

  def read(index):
    key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
    if key not in blocks:
      blocks[key] = np.asarray(source.read(index), dtype)
    return blocks[key]

  return jax.make_array_from_callback(shape, named_sharding, read)


def import_params(cfg: ModelConfig, vision_store, decoder_store, mesh: Mesh, *, upcycle: bool = False,
                  seed: int = 0) -> nnx.State:
  """The converted parameters as an nnx.State of arrays sharded on `mesh` by their logical axis names. A store that
  is None leaves its part (vision or decoder) to the model's initialiser."""
  _, abstract, _ = state_lib.abstract_model(cfg, seed)
  shardings = {p: v.get_value() if isinstance(v, nnx.Variable) else v
               for p, v in nnx.to_flat_state(sharding.param_shardings(abstract, mesh))}
  targets = dict(nnx.to_flat_state(abstract))
  sources = {}
  if vision_store is not None:
    vision_sources = (open_clip.vision_sources if open_clip.holds_open_clip(vision_store)
                      else hf_import.clip_vision_sources)
    sources.update({("vision",) + p: s for p, s in vision_sources(vision_store, cfg.vision).items()})
  if decoder_store is not None:
    sources.update({("decoder",) + p: s
                    for p, s in hf_import.decoder_sources(decoder_store, cfg.decoder, upcycle=upcycle).items()})
  random_parts = {"connector"} | {name for name, store in (("vision", vision_store), ("decoder", decoder_store))
                                  if store is None}

  def is_random(path):
    return path[0] in random_parts or (upcycle and path[0] == "decoder" and path[-2:] == ("ffn", "router"))

  hf_import.check_shapes({p: tuple(v.shape) for p, v in targets.items()}, sources, "HF import", is_random)
  values = _fresh_params(cfg, {p: v for p, v in targets.items() if p not in sources}, shardings, seed)
  for path, var in targets.items():
    if path in sources:
      values[path] = _read_sharded(sources[path], tuple(var.shape), np.dtype(var.dtype), shardings[path])
  for path, var in targets.items():
    var.set_value(values[path])
  return abstract


def convert(vision_dir: str, decoder_dir: str, out_dir: str, *, connector: ConnectorConfig | None = None,
            vocab_size: int = 0, tokenizer: str = "", upcycle: MoEConfig | None = None, feature_layer: int = -1,
            mesh: Mesh | None = None, seed: int = 0, base: ModelConfig | None = None) -> ModelConfig:
  """Converts and writes the checkpoint; returns its ModelConfig. mesh: default all devices on the fsdp axis.
  vision_dir or decoder_dir "": that part is initialised at random in the shape `base` gives it. Model folders on
  an object store are downloaded to a temporary local folder first (safetensors maps files)."""
  if not vision_dir and not decoder_dir:
    raise ValueError("give --vision, --decoder or both")
  with paths.local_copy(vision_dir) as vision_local, paths.local_copy(decoder_dir) as decoder_local:
    cfg, hf_vocab = model_config(read_vision_config(vision_local) if vision_dir else None,
                                 read_hf_config(decoder_local, vision=False) if decoder_dir else None,
                                 connector=connector or ConnectorConfig(), vocab_size=vocab_size, tokenizer=tokenizer,
                                 upcycle=upcycle, feature_layer=feature_layer, base=base)
    mesh = mesh if mesh is not None else sharding.make_mesh(MeshConfig(data=1, fsdp=-1))
    params = import_params(cfg, open_vision_store(vision_local) if vision_dir else None,
                           hf_import.SafetensorsStore(decoder_local) if decoder_dir else None,
                           mesh, upcycle=upcycle is not None, seed=seed)
  random_parts = (["connector"] + (["decoder MoE routers"] if upcycle is not None else [])
                  + (["vision"] if not vision_dir else []) + (["decoder"] if not decoder_dir else []))
  source = lambda d: paths.absolute(d) if d else None
  meta = {"model": config_lib.to_dict(cfg), "step": 0,
          "source": {"vision": source(vision_dir), "decoder": source(decoder_dir),
                     "hf_vocab_size": hf_vocab, "vocab_size": cfg.decoder.vocab_size, "new_vocab_rows": NEW_ROWS,
                     "upcycled": upcycle is not None, "random_init": random_parts, "seed": seed}}
  checkpoint.save_params(out_dir, params, meta)
  return cfg


def command(a) -> None:
  """`mm15 convert-hf` with its parsed flags."""
  upcycle = None
  if a.upcycle:
    upcycle = MoEConfig(num_experts=a.moe_experts or 64, top_k=a.moe_top_k, every=a.moe_every)
  elif a.moe_experts:
    raise SystemExit("--moe-experts turns a dense decoder into MoE only together with --upcycle")
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=a.fsdp, tensor=a.tensor, expert=a.expert))
  connector = ConnectorConfig(hidden=a.connector_hidden, depth=a.connector_depth, pooled_side=a.pooled_side)
  base = None
  if a.model:
    from mm15_jax.configs import presets
    base = presets.get(a.model)
  cfg = convert(a.vision, a.decoder, a.out, connector=connector, vocab_size=a.vocab_size, tokenizer=a.tokenizer,
                upcycle=upcycle, feature_layer=a.feature_layer, mesh=mesh, seed=a.seed, base=base)
  from mm15_jax.models.count import count
  n = count(cfg)
  print(json.dumps({"out": paths.absolute(a.out), "decoder_vocab": cfg.decoder.vocab_size,
                    "parameters_M": {k: round(v["total"] / 1e6, 1) for k, v in n.items()}}, indent=2))

