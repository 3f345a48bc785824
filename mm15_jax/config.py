"""Configuration: plain dataclasses, readable presets, dotted-key overrides.

A run is an `Experiment`: one model and the stages it trains through. A stage is data (mixture, resolution,
schedule, where to initialise from), never a new code path.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass
class VisionConfig:
  """CLIP-style ViT (pre-LN, class token)."""
  image_size: int = 378          # size the position embeddings were trained at
  patch_size: int = 14
  width: int = 1280
  depth: int = 32
  num_heads: int = 16
  mlp_dim: int = 5120
  act: str = "quick_gelu"        # "quick_gelu" (OpenAI/DFN CLIP) or "gelu"
  layer_norm_eps: float = 1e-5
  pre_norm: bool = True          # CLIP's `pre_layrnorm` after the embeddings
  feature_layer: int = -1        # which block's output feeds the connector (-1: last)


@dataclasses.dataclass
class ConnectorConfig:
  """C-Abstractor (Honeybee): RegStage -> adaptive avg pool -> RegStage -> MLP readout."""
  hidden: int = 1024
  depth: int = 3
  pooled_side: int = 12          # 12x12 = 144 tokens per image or tile
  se_ratio: float = 0.25


@dataclasses.dataclass
class MoEConfig:
  num_experts: int = 64
  top_k: int = 2
  every: int = 2                 # an MoE FFN in every `every`-th layer (the second of each pair)
  ffn_dim: int = 0               # 0: same as the dense FFN
  load_balance_weight: float = 0.01
  z_loss_weight: float = 0.001
  capacity_factor: float = 0.0   # 0: dropless; >0: capacity mode, drop rate reported
  grouped_matmul: str = "auto"   # dropless kernel: "ragged" (ragged_dot), "blocked", "auto" (blocked on CPU)


@dataclasses.dataclass
class DecoderConfig:
  """Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU."""
  vocab_size: int = 32000
  d_model: int = 2048
  num_layers: int = 16
  num_heads: int = 32
  num_kv_heads: int = 8
  head_dim: int = 0              # 0: d_model // num_heads
  ffn_dim: int = 8192
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False         # Qwen2-style
  max_len: int = 4096
  moe: MoEConfig | None = None


@dataclasses.dataclass
class ModelConfig:
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  connector: ConnectorConfig = dataclasses.field(default_factory=ConnectorConfig)
  decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
  dtype: str = "bfloat16"        # compute dtype; parameters stay float32
  param_dtype: str = "float32"
  remat: str = "none"            # "none" | "full" | "dots": rematerialisation of decoder/ViT blocks
  scan_layers: bool = True       # False: an unrolled loop (compile time grows with depth; 7% faster on CPU at depth 4)
  # Training loss: the LM head and cross-entropy run `loss_chunk` positions at a time over each row's loss tokens
  # (moved to the front), skipping chunks that hold none (image placeholders, prompts, padding). 0: all at once.
  loss_chunk: int = 256


@dataclasses.dataclass
class SplitConfig:
  """How images become tiles. mode: "none" (one encoding per image), "static", "dynamic"."""
  mode: str = "none"
  tile_size: int = 378
  n_min: int = 4                 # dynamic: fewest tiles
  n_max: int = 9                 # dynamic: most tiles
  static_grid: int = 2           # static: grid x grid tiles
  overview: bool = True          # add the whole image resized to one tile, after the tiles
  overview_first: bool = False   # ablation: the overview before the tiles instead
  tile_markers: str = "index"    # "index": <row_i> <col_j> before each tile; "separator" (ablation): "," between
                                 # the tiles of a row and "\n" between rows, as text tokens
  max_images_to_split: int = 2   # split only when a sample has fewer than 3 images
  resample: str = "fast"         # "fast" (OpenCV: box-reduce + bilinear/bicubic) | "antialias" (PIL bicubic)
  # The model enlarges tiles (bicubic, on the accelerator): the batch carries each tile's source pixels and their
  # extent (batch["image_extent"]), so the host never writes an enlarged tile. "fast" only; shrinks stay on the host.
  enlarge_on_device: bool = True


@dataclasses.dataclass
class SftMixtureConfig:
  """An SFT mixture by categories (data/mixture.py), resolved at start into data.mixture; name "" leaves
  data.mixture as given."""
  name: str = ""                 # base | single_image | all, or categories joined by "+" ("general+math")
  alpha: dict[str, float] = dataclasses.field(default_factory=dict)   # ratio to general, per category (overrides)
  group_weights: dict[str, float] = dataclasses.field(default_factory=dict)  # single_image/multi_image/text_only
  sources: dict[str, str] = dataclasses.field(default_factory=dict)   # dataset -> category ({}: the data dir's
                                                                      # datasets whose records name a category)
  within: str = "size"           # several datasets in a category: weighted by "size" or "equal"


@dataclasses.dataclass
class DataConfig:
  data_dir: str = ""
  tokenizer: str = ""            # sentencepiece model file
  mixture: dict[str, float] = dataclasses.field(default_factory=dict)  # source -> weight
  sft: SftMixtureConfig = dataclasses.field(default_factory=SftMixtureConfig)  # name set: replaces mixture
  equal_sources: bool = False    # stage 2: sources in exactly equal numbers in every batch
  # Sources added beside the mixture as shares of all samples, e.g. {"synth_caption": 0.2} (synthetic captions in
  # stage 2); the mixture's sources share the rest in their proportions (with equal_sources: still equally).
  extra_sources: dict[str, float] = dataclasses.field(default_factory=dict)
  split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
  seq_len: int = 4096
  max_images: int = 16           # image/tile slots per sequence
  pack: bool = True
  max_bad_fraction: float = 0.01 # bad records above this share stop the run
  max_image_pixels: int = 64_000_000  # decompression-bomb guard
  num_workers: int = 0           # Grain worker processes (0: in-process)
  seed: int = 0


@dataclasses.dataclass
class StageConfig:
  name: str = "stage"
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  steps: int = 1000
  epochs: float = 0.0            # > 0: the stage's length in epochs of its mixture; steps resolved at start
  batch_size: int = 256          # global, in packed rows of data.seq_len tokens
  grad_accum: int = 1
  learning_rate: float = 1e-5
  warmup_fraction: float = 0.01
  end_lr_fraction: float = 0.0
  clip_norm: float = 1.0
  weight_decay: float = 0.0
  trainable: str = ".*"          # regex over parameter paths; others are frozen
  image_size: int = 378          # encoder input: tile size of this stage
  init_from: str = ""            # "", "previous" (the stage before), or a checkpoint directory
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3      # the last K checkpoints ...
  keep_every: int = 0            # ... plus every step divisible by this (0: none)
  log_every: int = 10
  max_nonfinite_steps: int = 10
  eval_every: int = 0            # held-out evaluation every N steps into TensorBoard (0: never)
  eval_benchmarks: str = ""      # comma-separated test splits of data.data_dir ("": all)
  eval_max_examples: int = 64    # per benchmark, for the periodic evaluation


@dataclasses.dataclass
class MeshConfig:
  """Mesh axis sizes; -1 fills the rest. dcn_* are across slices (multi-slice)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1
  dcn_data: int = 1


@dataclasses.dataclass
class Experiment:
  name: str = "mm15"
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  stages: list[StageConfig] = dataclasses.field(default_factory=list)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  seed: int = 0


def to_dict(cfg) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def to_json(cfg) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def from_dict(cls, d: dict[str, Any]):
  """Rebuilds a (nested) config dataclass from `to_dict` output; unknown keys are errors."""
  names = {f.name: f for f in dataclasses.fields(cls)}
  unknown = set(d) - set(names)
  if unknown:
    raise KeyError(f"unknown config keys for {cls.__name__}: {sorted(unknown)}")
  kwargs = {}
  hints = _resolved_types(cls)
  for k, v in d.items():
    kwargs[k] = _build(hints[k], v)
  return cls(**kwargs)


def _resolved_types(cls):
  import typing
  return typing.get_type_hints(cls)


def _build(tp, v):
  import typing
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if dataclasses.is_dataclass(tp):
    return from_dict(tp, v)
  if origin is list and args and dataclasses.is_dataclass(args[0]):
    return [from_dict(args[0], x) for x in v]
  if args and type(None) in args and v is not None:  # Optional[X]
    (inner,) = [a for a in args if a is not type(None)]
    return _build(inner, v)
  return v


def override(cfg, assignments: list[str]):
  """Applies `key.sub=value` strings (value parsed as JSON when it parses, else a string).

  List items are addressed by index or, for stages, by name: `stages.sft.steps=10`.
  """
  for assignment in assignments:
    if "=" not in assignment:
      raise ValueError(f"override {assignment!r} is not of the form key=value")
    key, raw = assignment.split("=", 1)
    try:
      value = json.loads(raw)
    except json.JSONDecodeError:
      value = raw
    _set(cfg, key.split("."), value, key)
  return cfg


def _set(obj, path, value, full_key):
  head, rest = path[0], path[1:]
  if isinstance(obj, list):
    matches = [x for x in obj if getattr(x, "name", None) == head]
    if head.lstrip("-").isdigit():
      child = obj[int(head)]
    elif matches:
      child = matches[0]
    else:
      raise KeyError(f"config key {full_key!r}: no list item {head!r}")
    return _set(child, rest, value, full_key)
  if isinstance(obj, dict):
    if not rest:
      obj[head] = value
      return
    return _set(obj[head], rest, value, full_key)
  if not dataclasses.is_dataclass(obj) or head not in {f.name for f in dataclasses.fields(obj)}:
    raise KeyError(f"config key {full_key!r}: {type(obj).__name__} has no field {head!r}")
  if not rest:
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current) and isinstance(value, dict):
      value = from_dict(type(current), value)
    elif isinstance(current, float) and isinstance(value, int):
      value = float(value)
    elif current is not None and not isinstance(value, type(current)) and not (
        isinstance(current, (dict, list)) and isinstance(value, (dict, list))):
      raise TypeError(f"config key {full_key!r}: expected {type(current).__name__}, got {value!r}")
    setattr(obj, head, value)
    return
  return _set(getattr(obj, head), rest, value, full_key)
