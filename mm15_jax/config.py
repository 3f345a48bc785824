"""Configuration: plain dataclasses, readable presets, dotted-key overrides.

A run is an `Experiment`: one model and the stages it trains through. A stage is data (mixture, resolution,
schedule, where to initialise from), never a new code path.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from typing import Any

from mm15_jax.errors import UserError


@dataclasses.dataclass
class VisionConfig:
  """CLIP-style ViT (pre-LN, class token)."""
  image_size: int = 378          # size of its position embeddings (training sets it to the stage's image_size)
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
  # Subtract each tile's mean output token from its tokens. Tiles of flat synthetic images encode to tokens that
  # share one large component; after the decoder's RMSNorm they look alike, and a small model then takes thousands
  # of steps to learn where anything is. Off in the paper's presets (Honeybee's C-Abstractor has no such step).
  center_tokens: bool = False


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
  norm_topk: bool = True         # renormalise the top-k router probabilities (False: as they are, Qwen2-MoE's option)
  shared_expert_dim: int = 0     # >0: a sigmoid-gated shared SwiGLU expert of this width beside the routed ones
  # Dropless with mesh.expert > 1 (kernels/expert_parallel.py): rows one device sends another per layer, as a
  # multiple of its assignments / expert; 0: all of them (nothing dropped); f > 0: overflow dropped, in moe_drop_rate.
  ep_capacity_factor: float = 0.0


@dataclasses.dataclass
class RopeScaling:
  """RoPE frequencies for contexts past the pretraining length (HF rope_parameters): "linear" divides positions by
  `factor`; "dynamic" grows theta (NTK) with the longest position of each call past `original_max_len`; "llama3"
  divides long wavelengths by `factor` with a smooth band between low_freq_factor and high_freq_factor."""
  kind: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192


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
  rope_scaling: RopeScaling | None = None
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
  # Attention kernel (mm15_jax.kernels.attention): "auto" (blocked on CPU, splash on TPU, cudnn on GPU), "dense",
  # "blocked" (CPU, causal), "splash" (TPU Pallas; interpret mode elsewhere), "cudnn" (GPU).
  attention: str = "auto"
  # Training loss: the LM head and cross-entropy run `loss_chunk` positions at a time over each row's loss tokens
  # (moved to the front), skipping chunks that hold none (image placeholders, prompts, padding). 0: all at once.
  loss_chunk: int = 256

  @property
  def tokens_per_tile(self) -> int:
    """Decoder positions one image tile fills: the connector's pooled grid."""
    return self.connector.pooled_side ** 2


class RemovedKeyError(ValueError):
  """A config key that no longer exists, with what replaces it."""


# (config class, field) -> what to set instead
REMOVED_KEYS = {
    ("SplitConfig", "tile_size"): "the tile size is the stage's: set stages.<name>.image_size",
}


def _removed(cls_name: str, key: str, where: str) -> RemovedKeyError | None:
  hint = REMOVED_KEYS.get((cls_name, key))
  return None if hint is None else RemovedKeyError(f"config key {where!r} was removed: {hint}")


@dataclasses.dataclass
class SplitConfig:
  """How images become tiles. mode: "none" (one encoding per image), "static", "dynamic". The tile size is the
  stage's image_size."""
  mode: str = "none"
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
  tile_size: dataclasses.InitVar[int | None] = None  # removed: an error naming its replacement

  def __post_init__(self, tile_size):
    if tile_size is not None:
      raise _removed("SplitConfig", "tile_size", "data.split.tile_size")


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
class VideoConfig:
  """How a video becomes a sample's images (data/video.py): `frames` uniformly sampled frames, in temporal order,
  each one unsplit tile of the stage's image size, numbered by the image-index tokens <img_1>..<img_N>."""
  frames: int = 24               # at most this many frames per video (fewer when the video has fewer)
  timestamps: bool = True        # each frame's time in seconds as text ("3.5s") before its image block


@dataclasses.dataclass
class DataConfig:
  data_dir: str = ""
  tokenizer: str = ""            # sentencepiece .model, or an HF tokenizer.json / its directory
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
  video: VideoConfig = dataclasses.field(default_factory=VideoConfig)


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
  image_size: int = 378          # tile size of this stage: the encoder's input (model.vision.image_size follows it)
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


WANDB_MODES = ("online", "offline", "disabled")


@dataclasses.dataclass
class LoggingConfig:
  """Where a stage's scalars go besides <workdir>/<stage>/metrics.jsonl and TensorBoard (train/wandb_log.py)."""
  wandb: str = ""                # Weights & Biases "entity/project" or "project"; "" (the default): no W&B
  wandb_mode: str = "online"     # "online", "offline" (local files for `wandb sync`) or "disabled"


@dataclasses.dataclass
class ProfileConfig:
  """A jax.profiler trace of some train steps of each stage run, in <workdir>/<stage>/profile (train/profile.py)."""
  steps: str = ""                # "A:B": steps A..B-1, numbered as logged (step 1 carries the compile); "": none


@dataclasses.dataclass
class Experiment:
  name: str = "mm15"
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  stages: list[StageConfig] = dataclasses.field(default_factory=list)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  seed: int = 0
  logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
  profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)


def to_dict(cfg) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def to_json(cfg) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def from_dict(cls, d: dict[str, Any]):
  """Rebuilds a (nested) config dataclass from `to_dict` output; unknown keys are errors."""
  names = {f.name: f for f in dataclasses.fields(cls)}
  unknown = set(d) - set(names)
  for key in sorted(unknown):
    error = _removed(cls.__name__, key, key)
    if error is not None:
      raise error
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
      if not -len(obj) <= int(head) < len(obj):
        names = [getattr(x, "name", i) for i, x in enumerate(obj)]
        raise KeyError(f"config key {full_key!r}: index {head} out of range; the items are {names}")
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
    removed = _removed(type(obj).__name__, head, full_key)
    if removed is not None:
      raise removed
    raise KeyError(f"config key {full_key!r}: {type(obj).__name__} has no field {head!r}")
  if not rest:
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current) and isinstance(value, dict):
      value = from_dict(type(current), value)
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    elif isinstance(value, bool) and not isinstance(current, bool) and current is not None:
      raise TypeError(f"config key {full_key!r}: expected {type(current).__name__}, got {value!r}")
    elif current is not None and not isinstance(value, type(current)) and not (
        isinstance(current, (dict, list)) and isinstance(value, (dict, list))):
      raise TypeError(f"config key {full_key!r}: expected {type(current).__name__}, got {value!r}")
    setattr(obj, head, value)
    return
  return _set(getattr(obj, head), rest, value, full_key)


# --- validation: the whole experiment is checked before anything is built or compiled -------------------------------

def _type_error(key: str, value, want: str) -> UserError:
  return UserError(f"config key {key}={value!r}: expected {want}")


def _check_value(tp, value, key: str):
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, tp):
      raise _type_error(key, value, f"a {tp.__name__}")
    _check_types(value, key)
  elif args and type(None) in args:  # X | None
    if value is not None:
      (inner,) = [a for a in args if a is not type(None)]
      _check_value(inner, value, key)
  elif tp is bool:
    if not isinstance(value, bool):
      raise _type_error(key, value, "true or false")
  elif tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise _type_error(key, value, "an integer")
  elif tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise _type_error(key, value, "a finite number")
  elif tp is str:
    if not isinstance(value, str):
      raise _type_error(key, value, "a string")
  elif origin is dict:
    if not isinstance(value, dict):
      raise _type_error(key, value, "a mapping")
    for k, v in value.items():
      _check_value(args[0], k, f"{key}.{k}")
      _check_value(args[1], v, f"{key}.{k}")
  elif origin is list:
    if not isinstance(value, list):
      raise _type_error(key, value, "a list")
    for i, v in enumerate(value):
      _check_value(args[0], v, f"{key}.{getattr(v, 'name', i)}")


def _check_types(cfg, prefix: str = ""):
  hints = typing.get_type_hints(type(cfg))
  for f in dataclasses.fields(cfg):
    _check_value(hints[f.name], getattr(cfg, f.name), f"{prefix}.{f.name}" if prefix else f.name)


def _require(ok: bool, key: str, value, what: str):
  if not ok:
    raise UserError(f"config key {key}={value!r}: {what}")


# A W&B project: no '/', '\\', '#', '?', '%', ':' or whitespace; optionally after "entity/".
_WANDB_PROJECT = re.compile(r"(?:[^/\\#?%:\s]+/)?[^/\\#?%:\s]+")


def profile_steps(cfg: ProfileConfig) -> tuple[int, int] | None:
  """(A, B) of profile.steps="A:B", None when empty; raises UserError on anything but 1 <= A < B."""
  if not cfg.steps:
    return None
  match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", cfg.steps)
  first, end = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
  _require(match is not None and 1 <= first < end, "profile.steps", cfg.steps,
           "give A:B with 1 <= A < B: the trace covers steps A..B-1 (step 1 carries the compile)")
  return first, end


def _validate_tracking(exp: Experiment) -> None:
  _require(exp.logging.wandb_mode in WANDB_MODES, "logging.wandb_mode", exp.logging.wandb_mode,
           f"must be one of {', '.join(WANDB_MODES)}")
  _require(not exp.logging.wandb or _WANDB_PROJECT.fullmatch(exp.logging.wandb) is not None, "logging.wandb",
           exp.logging.wandb, "give a W&B \"entity/project\" or \"project\" (no spaces, '\\', '#', '?', '%', ':'), "
           "or '' for none")
  profile_steps(exp.profile)


def validate(exp: Experiment) -> None:
  """Types (no bool for a number), ranges and stage names of `exp`; raises UserError naming the key."""
  _check_types(exp)
  names = [s.name for s in exp.stages]
  _require(bool(names), "stages", names, "an experiment needs at least one stage")
  for i, stage in enumerate(exp.stages):
    _require(bool(stage.name) and "." not in stage.name and "/" not in stage.name, f"stages.{i}.name", stage.name,
             "a stage name is a non-empty word without '.' or '/'")
    _require(names.index(stage.name) == i, f"stages.{i}.name", stage.name, f"stage names must differ ({names})")
    key = f"stages.{stage.name}"
    for field in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "keep_checkpoints",
                  "max_nonfinite_steps", "image_size"):
      value = getattr(stage, field)
      _require(value >= 1, f"{key}.{field}", value, "must be a positive integer")
    for field in ("keep_every", "eval_every", "eval_max_examples"):
      value = getattr(stage, field)
      _require(value >= 0, f"{key}.{field}", value, "must be >= 0 (0 turns it off)")
    _require(stage.learning_rate > 0, f"{key}.learning_rate", stage.learning_rate, "must be > 0")
    for field in ("warmup_fraction", "end_lr_fraction"):
      value = getattr(stage, field)
      _require(0 <= value <= 1, f"{key}.{field}", value, "must be within [0, 1]")
    for field in ("clip_norm", "weight_decay"):
      value = getattr(stage, field)
      _require(value >= 0, f"{key}.{field}", value, "must be >= 0")
    _require(stage.batch_size % stage.grad_accum == 0, f"{key}.batch_size", stage.batch_size,
             f"must divide by grad_accum={stage.grad_accum}")
    _require(not (i == 0 and stage.init_from == "previous"), f"{key}.init_from", stage.init_from,
             "the first stage has no previous stage: use '' (random) or a checkpoint directory")
    data = stage.data
    for field in ("seq_len", "max_images", "max_image_pixels"):
      value = getattr(data, field)
      _require(value >= 1, f"{key}.data.{field}", value, "must be a positive integer")
    _require(data.num_workers >= 0, f"{key}.data.num_workers", data.num_workers, "must be >= 0")
    _require(0 <= data.max_bad_fraction <= 1, f"{key}.data.max_bad_fraction", data.max_bad_fraction,
             "must be within [0, 1]")
    for source, weight in data.mixture.items():
      _require(weight > 0, f"{key}.data.mixture.{source}", weight, "a mixture weight must be > 0")
  sizes = {f.name: getattr(exp.mesh, f.name) for f in dataclasses.fields(exp.mesh)}
  for axis, size in sizes.items():
    _require(size == -1 or size >= 1, f"mesh.{axis}", size, "an axis size is >= 1, or -1 for the rest")
  free = [a for a, v in sizes.items() if v == -1]
  _require(len(free) <= 1, "mesh", sizes, f"at most one axis may be -1 (got {free})")
  _validate_tracking(exp)


def validate_inputs(exp: Experiment, index: int, workdir: str, device_count: int | None = None) -> None:
  """What stage `index` reads and writes exists: the mesh fits the devices, the data dir, the tokenizer, an
  `init_from` directory, a writable workdir, the wandb package when logging.wandb is set. Raises UserError naming
  the key or path."""
  from etils import epath
  validate(exp)
  if device_count is None:
    import jax
    device_count = jax.device_count()
  from mm15_jax import sharding
  try:
    sharding.mesh_shape(exp.mesh, device_count)
  except ValueError as e:
    raise UserError(f"config key {e} (set mesh.* so that the axes multiply to {device_count})") from e
  stage = exp.stages[index]
  key = f"stages.{stage.name}"
  data_dir = stage.data.data_dir
  _require(bool(data_dir), f"{key}.data.data_dir", data_dir, "empty: set it to the folder holding the datasets")
  _require(epath.Path(data_dir).is_dir(), f"{key}.data.data_dir", data_dir,
           "no such folder (make one with `mm15 data synth` or `mm15 data convert`)")
  tokenizer = stage.data.tokenizer
  _require(bool(tokenizer) and epath.Path(tokenizer).exists(), f"{key}.data.tokenizer", tokenizer,
           "not found: give a sentencepiece .model file, a tokenizer.json or its folder")
  if stage.init_from not in ("", "previous"):
    _require(epath.Path(stage.init_from).is_dir(), f"{key}.init_from", stage.init_from,
             "no such checkpoint folder")
  _check_writable(workdir)
  from mm15_jax.train import wandb_log
  wandb_log.require_installed(exp.logging)


def _check_writable(workdir: str) -> None:
  from etils import epath
  from mm15_jax import paths
  if epath.Path(workdir).exists() and not epath.Path(workdir).is_dir():
    raise UserError(f"--workdir {workdir}: is a file, not a folder")
  try:
    paths.ensure_writable_dir(workdir)  # a probe object of its own; nothing already there is touched
  except paths.StorageError as e:
    raise UserError(f"--workdir {e}") from e
