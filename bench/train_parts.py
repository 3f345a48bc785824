"""Where the CPU train step's time goes: its parts, ours against the same parts of Hugging Face Llama (PyTorch).

    python bench/train_parts.py [--rounds N] [--quick] [--torch-threads N]

The sizes of bench/train_step.py's decoder (d_model 512, 8 query / 4 key-value heads, SwiGLU 1408; batch 2 x 1024
tokens), float32, forward + backward (gradients of sum(y * cotangent) with respect to the inputs and parameters):

  ffn        RMSNorm -> SwiGLU -> residual add (ours layers.RMSNorm/SwiGLU; LlamaRMSNorm, LlamaMLP)
  attention  causal grouped-query attention of q, k, v (ours decoder.attend, "auto"; torch's fused
             scaled_dot_product_attention with is_causal and enable_gqa, as transformers calls it)
  layer      one decoder layer with RoPE (ours decoder.DecoderBlock; LlamaDecoderLayer)
  vision     the ViT on the step's 4 images, patch tokens out (ours vit.VisionTransformer; CLIPVisionModel)
  connector  patch tokens -> image tokens (ours the C-Abstractor; LLaVA's 2-layer MLP projector): different designs
  head       LM head + cross-entropy of 2 x 1024 hidden states, loss on the step's positions (ours
             train.loss.weighted_cross_entropy, model.loss_chunk; torch Linear + cross_entropy over every position)
  optimizer  global-norm clipping and one AdaFactor update of the whole bench model's parameters (optax through
             mm15_jax.train.optim; torch.optim.Adafactor)
  matmul     one 2048 x 2048 float32 matmul (the GEMM libraries alone)

Each part's two sides run once per round, in alternating order, interleaved with the other parts; medians of wall
and process CPU time. Prints a markdown table and, last, one JSON line with everything.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as train_step_lib  # noqa: E402  (sets JAX_PLATFORMS=cpu before jax is imported)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from mm15_jax import machine  # noqa: E402
from mm15_jax.config import DecoderConfig, ModelConfig  # noqa: E402
from mm15_jax.data.batch import Batch  # noqa: E402
from mm15_jax.models import decoder as decoder_lib  # noqa: E402
from mm15_jax.models import layers  # noqa: E402
from mm15_jax.models.connector import CAbstractor  # noqa: E402
from mm15_jax.models.multimodal import MultimodalModel, normalize_images  # noqa: E402
from mm15_jax.models.vit import VisionTransformer  # noqa: E402
from mm15_jax.train import loss as loss_lib  # noqa: E402

PARTS = ("ffn", "attention", "layer", "vision", "connector", "head", "optimizer", "matmul")


def _cotangent(shape) -> np.ndarray:
  return np.random.default_rng(7).standard_normal(shape, dtype=np.float32)


def _ours_grad(module: nnx.Module, apply: Callable, x) -> Callable[[], tuple]:
  """A jitted forward + backward of `apply(module, x)` against a fixed cotangent: a call returning
  (parameter gradients, input gradient)."""
  graphdef, params = nnx.split(module)
  cotangent = _cotangent(x.shape)

  @jax.jit
  def grads(p, x):
    return jax.grad(lambda p, x: (apply(nnx.merge(graphdef, p), x) * cotangent).sum(), argnums=(0, 1))(p, x)

  return lambda: jax.block_until_ready(grads(params, x))


def _torch_grad(fn: Callable, leaves: list[torch.Tensor], cotangent: np.ndarray) -> Callable[[], list]:
  """The same for torch: a call returning the gradients of `leaves`."""
  cotangent = torch.from_numpy(cotangent)

  def call():
    for t in leaves:
      t.grad = None
    (fn() * cotangent).sum().backward()
    return [t.grad for t in leaves]

  return call


def ffn_pair(cfg: DecoderConfig, llama, b: int, t: int) -> dict[str, Callable[[], None]]:
  from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
  kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  ours = nnx.List([layers.RMSNorm(cfg.d_model, eps=cfg.rms_eps, **kw), layers.SwiGLU(cfg.d_model, cfg.ffn_dim, **kw)])
  x = jax.random.normal(jax.random.key(0), (b, t, cfg.d_model))
  norm, mlp = LlamaRMSNorm(cfg.d_model, cfg.rms_eps), LlamaMLP(llama)
  tx = torch.from_numpy(np.array(x)).requires_grad_()
  leaves = [tx, *norm.parameters(), *mlp.parameters()]
  return {"ours": _ours_grad(ours, lambda m, x: x + m[1](m[0](x)), x),
          "torch": _torch_grad(lambda: tx + mlp(norm(tx)), leaves, _cotangent(x.shape))}


def attention_pair(cfg: DecoderConfig, b: int, t: int) -> dict[str, Callable[[], None]]:
  h, g = cfg.num_heads, cfg.num_kv_heads
  k_dim = cfg.head_dim or cfg.d_model // h
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (b, t, n, k_dim)) for key, n in zip(keys, (h, g, g)))
  mask = decoder_lib.segment_causal_mask(jnp.ones((b, t), jnp.int32))
  cotangent_BTHK = _cotangent(q.shape)
  attend = jax.jit(jax.grad(lambda q, k, v: (decoder_lib.attend(q, k, v, mask, jnp.float32, causal=True)
                                             * cotangent_BTHK).sum(), argnums=(0, 1, 2)))
  # torch's layout: [B, heads, T, K]
  tq, tk, tv = (torch.from_numpy(np.array(a)).transpose(1, 2).contiguous().requires_grad_() for a in (q, k, v))
  sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
  return {"ours": lambda: jax.block_until_ready(attend(q, k, v)),
          "torch": _torch_grad(sdpa, [tq, tk, tv], np.ascontiguousarray(cotangent_BTHK.transpose(0, 2, 1, 3)))}


def layer_pair(cfg: DecoderConfig, llama, b: int, t: int) -> dict[str, Callable[[], None]]:
  from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
  block = decoder_lib.DecoderBlock(cfg, use_moe=False, dtype=jnp.float32, param_dtype=jnp.float32,
                                   rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (b, t, cfg.d_model))
  positions = jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1))
  segments = jnp.ones((b, t), jnp.int32)
  apply = lambda m, x: m(x, positions, segments, decoder_lib.segment_causal_mask(segments))[0]
  theirs = LlamaDecoderLayer(llama, layer_idx=0).train()
  tx = torch.from_numpy(np.array(x)).requires_grad_()
  tpos = torch.from_numpy(np.array(positions, np.int64))
  rope = LlamaRotaryEmbedding(llama)
  forward = lambda: theirs(tx, attention_mask=None, position_ids=tpos, position_embeddings=rope(tx, tpos))
  return {"ours": _ours_grad(block, apply, x),
          "torch": _torch_grad(forward, [tx, *theirs.parameters()], _cotangent(x.shape))}


def vision_pair(cfg: ModelConfig, llava, shapes: train_step_lib.BenchShapes, batch: Batch
                ) -> dict[str, Callable[[], None]]:
  from transformers import CLIPVisionModel
  vit = VisionTransformer(cfg.vision, scan_layers=cfg.scan_layers, dtype="float32", param_dtype="float32",
                          rngs=nnx.Rngs(0))
  s = shapes.image_size
  images = normalize_images(jnp.asarray(batch.images).reshape(-1, s, s, 3))
  grid = s // cfg.vision.patch_size
  theirs = CLIPVisionModel(llava.vision_config).train()
  pixels = torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2))).requires_grad_()
  patches = lambda: theirs(pixel_values=pixels).last_hidden_state[:, 1:]  # LLaVA's features: class token dropped
  cotangent = _cotangent((images.shape[0], grid * grid, cfg.vision.width))
  graphdef, params = nnx.split(vit)
  grads = jax.jit(jax.grad(lambda p: (nnx.merge(graphdef, p)(images) * cotangent).sum()))
  return {"ours": lambda: jax.block_until_ready(grads(params)),
          "torch": _torch_grad(patches, list(theirs.parameters()), cotangent)}


def connector_pair(cfg: ModelConfig, llava, shapes: train_step_lib.BenchShapes) -> dict[str, Callable[[], None]]:
  from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
  grid = shapes.image_size // cfg.vision.patch_size
  ours = CAbstractor(cfg.connector, in_dim=cfg.vision.width, out_dim=cfg.decoder.d_model, grid_side=grid,
                     dtype="float32", param_dtype="float32", rngs=nnx.Rngs(0))
  images = shapes.batch * shapes.images_per_row
  x = jax.random.normal(jax.random.key(0), (images, grid * grid, cfg.vision.width))
  theirs = LlavaMultiModalProjector(llava)
  tx = torch.from_numpy(np.array(x)).requires_grad_()
  cotangent = _cotangent((images, ours.tokens_per_image, cfg.decoder.d_model))
  graphdef, params = nnx.split(ours)
  grads = jax.jit(jax.grad(lambda p, x: (nnx.merge(graphdef, p)(x) * cotangent).sum(), argnums=(0, 1)))
  return {"ours": lambda: jax.block_until_ready(grads(params, x)),
          "torch": _torch_grad(lambda: theirs(tx), [tx, *theirs.parameters()], cotangent)}


def head_pair(cfg: ModelConfig, batch: Batch) -> dict[str, Callable[[], None]]:
  d, v = cfg.decoder.d_model, cfg.decoder.vocab_size
  b, t = batch.targets.shape
  x = jax.random.normal(jax.random.key(0), (b, t, d))
  w = jax.random.normal(jax.random.key(1), (d, v)) * d ** -0.5
  targets, mask = jnp.asarray(batch.targets), jnp.asarray(batch.loss_mask)
  mean_ce = lambda x, w: loss_lib.weighted_cross_entropy(
      x, w, targets, mask, head=MultimodalModel.head_logits, chunk=cfg.loss_chunk)[0] / mask.sum()
  grads = jax.jit(jax.grad(mean_ce, argnums=(0, 1)))
  tx = torch.from_numpy(np.array(x)).requires_grad_()
  tw = torch.from_numpy(np.array(w)).requires_grad_()
  t_targets = torch.from_numpy(batch.targets.astype(np.int64)).flatten()
  t_mask = torch.from_numpy(batch.loss_mask).flatten()

  def torch_grads():  # as bench/train_step.py's reference step: logits of every position, masked mean
    tx.grad = tw.grad = None
    ce = torch.nn.functional.cross_entropy((tx @ tw).flatten(0, 1), t_targets, reduction="none")
    ((ce * t_mask).sum() / t_mask.sum()).backward()
    return [tx.grad, tw.grad]

  return {"ours": lambda: jax.block_until_ready(grads(x, w)), "torch": torch_grads}


def optimizer_pair(cfg: ModelConfig, shapes: train_step_lib.BenchShapes) -> dict[str, Callable[[], None]]:
  batch = train_step_lib.make_batch(cfg, shapes)
  ours = train_step_lib.JaxTrainer(cfg, batch)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), ours.state.params)

  @jax.jit
  def update(params, opt_state):
    updates, opt_state = ours.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  state = [ours.state.params, ours.state.opt_state]

  def ours_step():
    state[:] = jax.block_until_ready(update(*state))

  theirs = train_step_lib.TorchTrainer(cfg, shapes, batch)
  for p in theirs.model.parameters():
    p.grad = torch.full_like(p, 1e-3)

  def torch_step():
    torch.nn.utils.clip_grad_norm_(theirs.model.parameters(), train_step_lib.CLIP_NORM)
    theirs.opt.step()

  return {"ours": ours_step, "torch": torch_step}


def run(*, rounds: int, quick: bool, torch_threads: int | None = None, command: str = "") -> dict:
  torch.set_num_threads(torch_threads or os.cpu_count())
  model_cfg, shapes = train_step_lib.bench_config(quick), train_step_lib.bench_shapes(quick)
  llava = train_step_lib.llava_config(model_cfg, shapes)
  cfg, llama = model_cfg.decoder, llava.text_config
  b, t = shapes.batch, shapes.seq_len
  batch = train_step_lib.make_batch(model_cfg, shapes)
  matmul = train_step_lib.matmul_fns(256 if quick else train_step_lib.MATMUL_SIDE)
  pairs = {"ffn": ffn_pair(cfg, llama, b, t), "attention": attention_pair(cfg, b, t),
           "layer": layer_pair(cfg, llama, b, t),
           "vision": vision_pair(model_cfg, llava, shapes, batch),
           "connector": connector_pair(model_cfg, llava, shapes),
           "head": head_pair(model_cfg, batch),
           "optimizer": optimizer_pair(model_cfg, shapes),
           "matmul": {"ours": matmul["jax_matmul"], "torch": matmul["torch_matmul"]}}
  fns = {f"{part}/{side}": fn for part, pair in pairs.items() for side, fn in pair.items()}
  times = train_step_lib.time_interleaved(fns, rounds)
  median = lambda name, kind: statistics.median(times[name][kind])
  parts = {}
  for part in PARTS:
    ours, theirs = times[f"{part}/ours"], times[f"{part}/torch"]
    parts[part] = {"ours_s": median(f"{part}/ours", "wall"), "torch_s": median(f"{part}/torch", "wall"),
                   "ours_cpu_s": median(f"{part}/ours", "cpu"), "torch_cpu_s": median(f"{part}/torch", "cpu"),
                   "time_ratio_per_round": statistics.median(o / w for o, w in zip(ours["wall"], theirs["wall"]))}
  return {**machine.describe(command), "rounds": rounds, "torch_threads": torch.get_num_threads(),
          "shapes": dataclasses.asdict(shapes), "decoder": dataclasses.asdict(cfg), "parts": parts, "times_s": times}


def markdown(r: dict) -> str:
  rows = ["| part | ours ms | torch ms | ours / torch time (per round) | CPU time ratio |", "|---|---|---|---|---|"]
  for part, p in r["parts"].items():
    rows.append(f"| {part} | {1e3 * p['ours_s']:.1f} | {1e3 * p['torch_s']:.1f} | "
                f"{p['time_ratio_per_round']:.2f} | {p['ours_cpu_s'] / p['torch_cpu_s']:.2f} |")
  return "\n".join(rows)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=9, help="timed rounds (after one untimed one)")
  parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
  parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: every core)")
  args = parser.parse_args(argv)
  command = " ".join(["python bench/train_parts.py", *(sys.argv[1:] if argv is None else argv)])
  result = run(rounds=args.rounds, quick=args.quick, torch_threads=args.torch_threads or None, command=command)
  print(markdown(result))
  print(json.dumps(result, sort_keys=True))
  return result


if __name__ == "__main__":
  main()
