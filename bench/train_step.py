"""CPU train-step benchmark: our JAX model against a same-size Hugging Face LLaVA (PyTorch), in one process.

    python bench/train_step.py [--steps N] [--quick] [--with-dense] [--attention auto|dense|blocked]
                               [--torch-threads N] [--torch-attn sdpa|eager] [--dtype float32|bfloat16]

Both sides: CLIP ViT -> connector -> Llama-style decoder (GQA, SwiGLU, untied LM head), float32 compute by default;
--dtype bfloat16 is mixed precision on both (ours: model.dtype="bfloat16" with float32 parameters, theirs:
torch.autocast("cpu", torch.bfloat16); the reference matmul then multiplies bfloat16 matrices, accumulating in
float32), which runs bfloat16 kernels where the CPU has them (AMX, AVX512-BF16). One sequence per row (no padding),
the same batch and random-init weights of the same shapes, masked next-token cross-entropy in float32, global-norm
clipping at 1.0 and AdaFactor: ours is optax through mm15_jax.train.optim.make_optimizer (absolute step size),
theirs torch.optim.Adafactor (steps relative to each parameter's RMS, as the paper), so their losses move
differently; the update costs O(params) on both sides.

Connectors differ by design: ours is the C-Abstractor (RegNet stages; pooled_side = the ViT's grid side, so the
adaptive pooling keeps every position), LLaVA's a 2-layer MLP over the patch tokens. Both give the decoder
(image_size / patch_size)^2 tokens per image from the last ViT block (LLaVA: vision_feature_layer=-1, class token
dropped), so the decoders see identical sequences; parameter counts and analytic FLOPs of each side are reported.
Attention: ours is the decoder's causal attention ("auto": blocked on CPU, see mm15_jax.kernels.attention), LLaVA's
the transformers default (sdpa: torch's fused CPU kernel).

Timing, built for a shared, loaded host: rounds of one full step each (forward + backward + update; JAX, torch, and
with --with-dense our step with the dense attention) plus one 2048 x 2048 float32 matmul per framework, in
alternating order; medians of wall time and of process CPU time (all threads). MFU is the analytic model FLOPs
(mm15_jax.train.flops; causal attention counted as half the square) per second over the same rounds' matmul rate
(a CPU has no useful data-sheet peak); the CPU-time variant divides FLOPs per CPU-second by the matmul's, which
load on the host distorts less. Prints a markdown table and, last, one JSON line with everything.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark: never probe for accelerators (libtpu may be here)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mm15_jax import machine  # noqa: E402
from mm15_jax import sharding  # noqa: E402
from mm15_jax.config import (ConnectorConfig, DecoderConfig, Experiment, MeshConfig, ModelConfig,  # noqa: E402
                             StageConfig, VisionConfig)
from mm15_jax.data.batch import Batch  # noqa: E402
from mm15_jax.models import count as count_lib  # noqa: E402
from mm15_jax.kernels import attention as attention_lib  # noqa: E402
from mm15_jax.models import decoder as decoder_lib  # noqa: E402
from mm15_jax.models.multimodal import CLIP_MEAN, CLIP_STD  # noqa: E402
from mm15_jax.train import flops as flops_lib  # noqa: E402
from mm15_jax.train import optim  # noqa: E402
from mm15_jax.train import stage as stage_lib  # noqa: E402

IMAGE_TOKEN_ID = 3
LEARNING_RATE = 1e-3
CLIP_NORM = 1.0
MATMUL_SIDE = 2048


@dataclasses.dataclass(frozen=True)
class BenchShapes:
  batch: int
  seq_len: int
  images_per_row: int
  image_size: int


def bench_config(quick: bool = False) -> ModelConfig:
  """The benchmark model; `quick`: tiny sizes for the smoke test. pooled_side = grid side (equal image tokens)."""
  if quick:
    vision = VisionConfig(image_size=28, patch_size=14, width=32, depth=1, num_heads=2, mlp_dim=64)
    connector = ConnectorConfig(hidden=32, depth=1, pooled_side=2, se_ratio=0.25)
    decoder = DecoderConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                            max_len=64)
  else:
    vision = VisionConfig(image_size=168, patch_size=14, width=256, depth=4, num_heads=4, mlp_dim=1024)
    connector = ConnectorConfig(hidden=256, depth=2, pooled_side=12, se_ratio=0.25)
    decoder = DecoderConfig(vocab_size=8192, d_model=512, num_layers=4, num_heads=8, num_kv_heads=4, ffn_dim=1408,
                            max_len=1024)
  # Unrolled layers: at depth 4 compile time is no concern, and the scan's stacked residual buffers (zero-filled,
  # then written and read a layer at a time) cost 7% of the step on CPU (BENCHMARKS.md section 1).
  return ModelConfig(vision=vision, connector=connector, decoder=decoder, dtype="float32", param_dtype="float32",
                     remat="none", scan_layers=False)


def bench_shapes(quick: bool = False) -> BenchShapes:
  """Batch 2 x 1024 tokens, two 168 px images per row: ~240 GFLOP per train step, a few seconds on 2 cores."""
  if quick:
    return BenchShapes(batch=2, seq_len=64, images_per_row=2, image_size=28)
  return BenchShapes(batch=2, seq_len=1024, images_per_row=2, image_size=168)


def tokens_per_image(cfg: ModelConfig, shapes: BenchShapes) -> int:
  grid = shapes.image_size // cfg.vision.patch_size
  if cfg.connector.pooled_side != grid:
    raise ValueError(f"connector.pooled_side {cfg.connector.pooled_side} != ViT grid side {grid}: LLaVA's MLP "
                     f"projector keeps all {grid * grid} patch tokens, the decoders would see different sequences")
  return grid * grid


def make_batch(cfg: ModelConfig, shapes: BenchShapes, seed: int = 0) -> Batch:
  """A training batch (the trainer's contract): one sequence per row, image n's K placeholders at n * T / N + 1."""
  rng = np.random.default_rng(seed)
  b, t, n, s = shapes.batch, shapes.seq_len, shapes.images_per_row, shapes.image_size
  k = tokens_per_image(cfg, shapes)
  if n * k + n + 1 > t or t // n <= k + 1:
    raise ValueError(f"{n} images of {k} tokens do not fit a row of {t} tokens")
  ids = rng.integers(IMAGE_TOKEN_ID + 1, cfg.decoder.vocab_size, (b, t + 1)).astype(np.int32)
  for i in range(n):
    start = i * (t // n) + 1
    ids[:, start:start + k] = IMAGE_TOKEN_ID
  tokens, targets = ids[:, :-1], ids[:, 1:]
  return Batch(
      tokens=np.ascontiguousarray(tokens), targets=np.ascontiguousarray(targets),
      loss_mask=(targets != IMAGE_TOKEN_ID).astype(np.float32), segment_ids=np.ones((b, t), np.int32),
      positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
      images=rng.integers(0, 256, (b, n, s, s, 3), dtype=np.uint8), image_mask=np.ones((b, n), bool),
      source_ids=np.zeros((b, t), np.int32))


# ------------------------------------------------------------------------------------------------------------------
# The two sides


class JaxTrainer:
  """Our model, optimiser and jitted train step (state donated) on one CPU device."""

  def __init__(self, cfg: ModelConfig, batch: Batch, *, seed: int = 0, compiler_options: dict | None = None):
    self.mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    stage = StageConfig(steps=1000, learning_rate=LEARNING_RATE, warmup_fraction=0.0, clip_norm=CLIP_NORM,
                        image_size=cfg.vision.image_size)
    exp = Experiment(model=cfg, stages=[stage], mesh=MeshConfig(data=1), seed=seed)
    built = stage_lib.build_stage(exp, 0, self.mesh, vocab_size=cfg.decoder.vocab_size, image_token_id=IMAGE_TOKEN_ID,
                                  init="random", num_sources=1, compiler_options=compiler_options)
    self.state, self.tx, self._step = built.state, built.tx, built.step
    self.batch = sharding.global_batch(batch, self.mesh)

  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.state.params))

  def params_numpy(self) -> dict[str, np.ndarray]:
    tree = jax.tree_util.tree_leaves_with_path(self.state.params)
    return {optim.path_str(p): np.array(x) for p, x in tree}

  def step(self) -> float:
    with sharding.use_mesh(self.mesh):
      self.state, metrics = self._step(self.state, self.batch)
    return float(metrics["loss"])  # blocks until the step is done


def llava_config(cfg: ModelConfig, shapes: BenchShapes, attn_implementation: str = "sdpa"):
  """transformers.LlavaConfig of the same sizes: CLIP ViT (last block's patch tokens), MLP projector, Llama."""
  import transformers
  v, d = cfg.vision, cfg.decoder
  vision = transformers.CLIPVisionConfig(
      hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
      image_size=shapes.image_size, patch_size=v.patch_size, hidden_act=v.act, layer_norm_eps=v.layer_norm_eps)
  text = transformers.LlamaConfig(
      vocab_size=d.vocab_size, hidden_size=d.d_model, intermediate_size=d.ffn_dim, num_hidden_layers=d.num_layers,
      num_attention_heads=d.num_heads, num_key_value_heads=d.num_kv_heads, head_dim=d.head_dim or None,
      max_position_embeddings=max(d.max_len, shapes.seq_len), rms_norm_eps=d.rms_eps,
      tie_word_embeddings=d.tie_embeddings, attention_bias=d.qkv_bias,
      rope_parameters={"rope_type": "default", "rope_theta": d.rope_theta})
  return transformers.LlavaConfig(
      vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
      image_seq_length=tokens_per_image(cfg, shapes), vision_feature_layer=v.feature_layer,
      vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=d.tie_embeddings,
      attn_implementation=attn_implementation)


class TorchTrainer:
  """transformers.LlavaForConditionalGeneration with the same loss, clipping and torch.optim.Adafactor."""

  def __init__(self, cfg: ModelConfig, shapes: BenchShapes, batch: Batch, *, seed: int = 0,
               attn_implementation: str = "sdpa"):
    import transformers
    torch.manual_seed(seed)
    self.autocast = cfg.dtype != "float32"  # mixed precision like ours: float32 parameters, bfloat16 compute
    self.model = transformers.LlavaForConditionalGeneration(llava_config(cfg, shapes, attn_implementation)).train()
    self.opt = torch.optim.Adafactor(self.model.parameters(), lr=LEARNING_RATE)
    b, n, s = batch.images.shape[:3]
    pixels = batch.images.reshape(b * n, s, s, 3).astype(np.float32) / 255.0
    pixels = (pixels - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    self.pixel_values = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    self.input_ids = torch.from_numpy(batch.tokens.astype(np.int64))
    self.targets = torch.from_numpy(batch.targets.astype(np.int64))
    self.loss_mask = torch.from_numpy(batch.loss_mask)

  def num_params(self) -> int:
    return sum(p.numel() for p in self.model.parameters())

  def params_numpy(self) -> dict[str, np.ndarray]:
    return {k: p.detach().numpy().copy() for k, p in self.model.named_parameters()}

  def part_params(self) -> dict[str, int]:
    m = self.model.model
    parts = {"vision": m.vision_tower, "connector": m.multi_modal_projector, "decoder": m.language_model}
    out = {k: sum(p.numel() for p in mod.parameters()) for k, mod in parts.items()}
    out["decoder"] += sum(p.numel() for p in self.model.lm_head.parameters())
    return out

  def step(self) -> float:
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
      logits = self.model(input_ids=self.input_ids, pixel_values=self.pixel_values, use_cache=False).logits
    ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten(), reduction="none")
    loss = (ce * self.loss_mask.flatten()).sum() / self.loss_mask.sum().clamp(min=1.0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_NORM)
    self.opt.step()
    return float(loss.detach())


# ------------------------------------------------------------------------------------------------------------------
# Counting


def param_counts_ours(cfg: ModelConfig) -> dict[str, int]:
  counts = count_lib.count(cfg)
  return {part: counts[part]["total"] for part in ("vision", "connector", "decoder")}


def projector_flops_per_image(cfg: ModelConfig, shapes: BenchShapes) -> int:
  d_in, d = cfg.vision.width, cfg.decoder.d_model
  return 2 * tokens_per_image(cfg, shapes) * (d_in * d + d * d)


def train_flops(cfg: ModelConfig, shapes: BenchShapes) -> dict[str, int]:
  """Analytic train-step FLOPs (3 x forward; causal attention as half the square) of each side, and their parts."""
  images = shapes.batch * shapes.images_per_row
  v, grid = cfg.vision, shapes.image_size // cfg.vision.patch_size
  vit = images * flops_lib.vit_forward_flops_per_tile(v, shapes.image_size)
  cabs = images * flops_lib.connector_forward_flops_per_tile(cfg.connector, grid_side=grid, in_dim=v.width,
                                                             out_dim=cfg.decoder.d_model)
  mlp = images * projector_flops_per_image(cfg, shapes)
  text = shapes.batch * flops_lib.decoder_forward_flops(cfg.decoder, seq_len=shapes.seq_len)
  ours = flops_lib.train_step_flops(cfg, batch_size=shapes.batch, seq_len=shapes.seq_len,
                                    max_images=shapes.images_per_row, tile_size=shapes.image_size)
  if ours != 3 * (vit + cabs + text):
    raise AssertionError(f"flops.train_step_flops {ours} != 3 x (ViT + connector + decoder) {3 * (vit + cabs + text)}")
  return {"ours": ours, "torch": 3 * (vit + mlp + text), "vit": 3 * vit, "decoder": 3 * text,
          "connector_ours": 3 * cabs, "connector_torch": 3 * mlp}


# ------------------------------------------------------------------------------------------------------------------
# Timing


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
                     ) -> dict[str, dict[str, list[float]]]:
  """{name: {"wall": [...], "cpu": [...]}} seconds per call, one call of each function per round in alternating
  order (load drifts hit every function alike). "cpu" is this process's CPU time over all its threads."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {name: {"wall": [], "cpu": []} for name in fns}
  for i in range(rounds):
    for name in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
      wall, cpu = time.perf_counter(), time.process_time()
      fns[name]()
      times[name]["cpu"].append(time.process_time() - cpu)
      times[name]["wall"].append(time.perf_counter() - wall)
  return times


def matmul_fns(n: int = MATMUL_SIDE, dtype: str = "float32") -> dict[str, Callable[[], None]]:
  """One n x n matmul per call: jitted JAX and torch, on the same numbers; bfloat16 operands accumulate in float32
  on both (torch's CPU GEMM does; JAX is asked to)."""
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((2, n, n), dtype=np.float32)
  ja, jb = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
  ta, tb = (torch.from_numpy(x).to(getattr(torch, dtype)) for x in (a, b))
  jmm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32).astype(x.dtype))
  tol = dict(rtol=1e-3, atol=1e-2) if dtype == "float32" else dict(rtol=2e-2, atol=0.5)
  np.testing.assert_allclose(np.asarray(jmm(ja, jb), np.float32), torch.matmul(ta, tb).float().numpy(), **tol)
  return {"jax_matmul": lambda: jmm(ja, jb).block_until_ready(), "torch_matmul": lambda: torch.matmul(ta, tb)}


def run(*, steps: int, quick: bool, attention: str = "auto", compiler_options: dict | None = None,
        torch_attn: str = "sdpa", torch_threads: int | None = None, with_dense: bool = False,
        dtype: str = "float32", command: str = "") -> dict:
  """Builds both sides, times them and returns every figure (the JSON line's content). Sets torch's thread count
  (default: every core, as XLA's CPU client uses). with_dense: also times our step with the dense attention
  ("ours_dense"), interleaved with the rest."""
  torch.set_num_threads(torch_threads or os.cpu_count())
  cfg, shapes = dataclasses.replace(bench_config(quick), dtype=dtype), bench_shapes(quick)
  matmul_side = 256 if quick else MATMUL_SIDE
  batch = make_batch(cfg, shapes)
  load_before = os.getloadavg()[0]
  ours = JaxTrainer(dataclasses.replace(cfg, attention=attention), batch, compiler_options=compiler_options)
  theirs = TorchTrainer(cfg, shapes, batch, attn_implementation=torch_attn)
  before = {"ours": ours.params_numpy(), "torch": theirs.params_numpy()}
  start = time.perf_counter()
  first_loss = {"ours": ours.step()}
  first_loss["torch"] = theirs.step()
  first_steps_s = time.perf_counter() - start  # our compile + both sides' first step
  unchanged = {"ours": _unchanged(before["ours"], ours.params_numpy()),
               "torch": _unchanged(before["torch"], theirs.params_numpy())}
  del before
  steppers = {"ours": ours.step, "torch": theirs.step}
  if with_dense:
    dense = JaxTrainer(dataclasses.replace(cfg, attention="dense"), batch, compiler_options=compiler_options)
    first_loss["ours_dense"] = dense.step()
    steppers["ours_dense"] = dense.step
  times = time_interleaved({**steppers, **matmul_fns(matmul_side, dtype)}, steps, warmup=0)
  last_loss = {k: fn() for k, fn in steppers.items()}

  flops = train_flops(cfg, shapes)
  tokens = shapes.batch * shapes.seq_len
  med = lambda name, kind="wall": statistics.median(times[name][kind])
  step_s = {k: med(k) for k in steppers}
  matmul = {k: 2 * matmul_side ** 3 / med(f"{k}_matmul") for k in ("jax", "torch")}
  matmul_cpu = {k: 2 * matmul_side ** 3 / med(f"{k}_matmul", "cpu") for k in ("jax", "torch")}
  side_flops = lambda k: flops["torch" if k == "torch" else "ours"]
  side_rate = lambda k, rates=matmul: rates["torch" if k == "torch" else "jax"]
  per_round = lambda a, b: statistics.median(x / y for x, y in zip(times[a]["wall"], times[b]["wall"]))
  result = {
      **machine.describe(command), "load_avg_1m_before": round(load_before, 2),
      "torch_threads": torch.get_num_threads(),
      "shapes": dataclasses.asdict(shapes), "tokens_per_step": tokens,
      "tokens_per_image": tokens_per_image(cfg, shapes),
      "model": {"vision": dataclasses.asdict(cfg.vision), "connector": dataclasses.asdict(cfg.connector),
                "decoder": dataclasses.asdict(cfg.decoder), "dtype": cfg.dtype},
      "attention": {"ours": _our_attention(attention, shapes.seq_len), "torch": torch_attn},
      "params": {"ours": param_counts_ours(cfg), "torch": theirs.part_params(), "ours_total": ours.num_params(),
                 "torch_total": theirs.num_params()},
      "params_unchanged_by_first_step": unchanged,
      "flops": flops,
      "first_loss": first_loss, "last_loss": last_loss, "first_steps_s": round(first_steps_s, 3),
      "steps": steps,
      "times_s": {k: {kind: [round(x, 4) for x in v] for kind, v in t.items()} for k, t in times.items()},
      "step_s_median": step_s,
      "step_cpu_s_median": {k: med(k, "cpu") for k in steppers},
      "tokens_per_s": {k: tokens / v for k, v in step_s.items()},
      "speed_ratio_ours_over_torch": step_s["torch"] / step_s["ours"],
      "speed_ratio_per_round_median": per_round("torch", "ours"),
      "speed_ratio_cpu_time": med("torch", "cpu") / med("ours", "cpu"),
      "matmul_side": matmul_side, "matmul_flops_per_s": matmul,
      "model_flops_per_s": {k: side_flops(k) / v for k, v in step_s.items()},
      "mfu_of_matmul": {k: side_flops(k) / v / side_rate(k) for k, v in step_s.items()},
      "matmul_flops_per_cpu_s": matmul_cpu,
      "mfu_of_matmul_cpu_time": {k: side_flops(k) / med(k, "cpu") / side_rate(k, matmul_cpu) for k in steppers},
  }
  if with_dense:
    result["speedup_over_dense_attention"] = {"medians": step_s["ours_dense"] / step_s["ours"],
                                              "per_round_median": per_round("ours_dense", "ours"),
                                              "cpu_time": med("ours_dense", "cpu") / med("ours", "cpu")}
  return result


def _our_attention(attention: str, seq_len: int) -> str:
  impl = attention_lib.resolve(attention, "cpu")
  return "dense (one block)" if impl == "blocked" and seq_len <= decoder_lib.CAUSAL_BLOCK else impl


def _unchanged(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> list[str]:
  """Names of the parameter arrays a step left exactly as they were."""
  return sorted(k for k in before if np.array_equal(before[k], after[k]))


def markdown(r: dict) -> str:
  g = lambda x: f"{x / 1e9:.1f}"
  m = lambda x: f"{x / 1e6:.2f}"
  both = lambda f: tuple(f(k) for k in ("ours", "torch"))
  rows = [
      ("parameters (M): vision / connector / decoder",
       *both(lambda k: " / ".join(m(r["params"][k][p]) for p in ("vision", "connector", "decoder")))),
      ("parameters total (M)", m(r["params"]["ours_total"]), m(r["params"]["torch_total"])),
      ("connector", "C-Abstractor", "2-layer MLP"),
      ("connector train GFLOP", g(r["flops"]["connector_ours"]), g(r["flops"]["connector_torch"])),
      ("train-step model GFLOP (causal)", *both(lambda k: g(r["flops"][k]))),
      ("attention", r["attention"]["ours"], r["attention"]["torch"]),
      ("step s, median wall", *both(lambda k: f"{r['step_s_median'][k]:.3f}")),
      ("step s, median process CPU", *both(lambda k: f"{r['step_cpu_s_median'][k]:.3f}")),
      ("tokens/s", *both(lambda k: f"{r['tokens_per_s'][k]:.0f}")),
      ("model GFLOP/s", *both(lambda k: g(r["model_flops_per_s"][k]))),
      (f"{r['matmul_side']}^2 {r['model']['dtype']} matmul GFLOP/s", g(r["matmul_flops_per_s"]["jax"]),
       g(r["matmul_flops_per_s"]["torch"])),
      ("MFU (of that matmul rate)", *both(lambda k: f"{100 * r['mfu_of_matmul'][k]:.1f}%")),
      ("MFU in CPU time (FLOP per CPU-s / matmul's)", *both(lambda k: f"{100 * r['mfu_of_matmul_cpu_time'][k]:.1f}%")),
      ("loss first / last", *both(lambda k: f"{r['first_loss'][k]:.3f} / {r['last_loss'][k]:.3f}")),
  ]
  s = r["shapes"]
  head = (f"batch {s['batch']} x {s['seq_len']} tokens, {s['images_per_row']} images of {s['image_size']} px per "
          f"row ({r['tokens_per_image']} tokens each), {r['model']['dtype']}; {r['machine']['cpus']} x "
          f"{r['machine']['cpu_model']}, 1-min load average {r['load_avg_1m_before']} before, "
          f"{r['machine']['load_avg'][0]} after; torch threads {r['torch_threads']}; {r['steps']} interleaved "
          f"rounds\n\n")
  lines = ["| | ours (JAX) | LLaVA (torch) |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
  ratios = (f"ours / torch speed: {r['speed_ratio_ours_over_torch']:.2f}x (medians), "
            f"{r['speed_ratio_per_round_median']:.2f}x (median of per-round ratios), "
            f"{r['speed_ratio_cpu_time']:.2f}x (CPU time)")
  if "speedup_over_dense_attention" in r:
    d = r["speedup_over_dense_attention"]
    ratios = (f"ours with dense attention: {r['step_s_median']['ours_dense']:.3f} s/step, "
              f"{r['tokens_per_s']['ours_dense']:.0f} tokens/s, MFU {100 * r['mfu_of_matmul']['ours_dense']:.1f}%; "
              f"{r['attention']['ours']} / dense speed: {d['medians']:.2f}x (medians), {d['per_round_median']:.2f}x "
              f"(per round), {d['cpu_time']:.2f}x (CPU time)\n") + ratios
  return head + "\n".join(lines) + "\n\n" + ratios


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=5, help="timed steps per side (after one untimed step)")
  parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
  parser.add_argument("--attention", default="auto", choices=attention_lib.IMPLS,
                      help="our decoder's attention implementation")
  parser.add_argument("--torch-attn", default="sdpa", choices=("sdpa", "eager"), help="LLaVA's attention")
  parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: every core)")
  parser.add_argument("--with-dense", action="store_true",
                      help="also time our step with the dense masked attention (interleaved)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute dtype of both sides (bfloat16: mixed precision, float32 parameters)")
  args = parser.parse_args(argv)
  command = " ".join(["python bench/train_step.py", *(sys.argv[1:] if argv is None else argv)])
  result = run(steps=args.steps, quick=args.quick, attention=args.attention, torch_attn=args.torch_attn,
               torch_threads=args.torch_threads or None, with_dense=args.with_dense, dtype=args.dtype,
               command=command)
  print(markdown(result))
  print(json.dumps(result, sort_keys=True))
  return result


if __name__ == "__main__":
  main()
