"""Shared pieces of the training-engine tests: a tiny model, synthetic batches, the synthetic corpus, a tiny stage.

Compiles dominate these tests on CPU, so every test file turns on jax's persistent compilation cache in a
session-scoped directory: the runner rebuilds (and re-jits) its step in every `run_stage` call, and identical
programs are then compiled once per session.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from mm15_jax import sharding
from mm15_jax.data.batch import Batch
from mm15_jax.config import (ConnectorConfig, DecoderConfig, Experiment, MeshConfig, ModelConfig, MoEConfig,
                             VisionConfig)

# Programs the tests jit themselves run a handful of times: LLVM's optimisation passes would cost more than they save.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
IMAGE_SIZE = 16      # tile side of the step tests (patch 4 -> 4x4 grid)
POOLED_SIDE = 2      # connector output 2x2 = 4 tokens per tile
TOKENS_PER_TILE = POOLED_SIDE ** 2


def tiny_model(vocab_size: int = 256, *, moe: bool = True, image_size: int = IMAGE_SIZE) -> ModelConfig:
  """The recipe's structure (ViT, C-Abstractor, decoder with an MoE FFN) at the smallest useful size.

  Compile time grows with the number of parameter arrays, so the optional pieces the engine is indifferent to
  (ViT pre-LN, connector squeeze-excite) are off.
  """
  return ModelConfig(
      vision=VisionConfig(image_size=image_size, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64,
                          pre_norm=False),
      connector=ConnectorConfig(hidden=32, depth=1, pooled_side=POOLED_SIDE, se_ratio=0.0),
      decoder=DecoderConfig(vocab_size=vocab_size, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2,
                            ffn_dim=64, max_len=256,
                            moe=MoEConfig(num_experts=4, top_k=2, every=1) if moe else None),
      dtype="float32", param_dtype="float32", remat="none", scan_layers=True,
      loss_chunk=16)  # the chunked loss at the tests' 64-token rows: padded tails skipped


def mesh_of(cfg: MeshConfig, num_devices: int | None = None):
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  return sharding.make_mesh(cfg, devices)


def synthetic_batch(seed: int, *, batch: int = 8, seq_len: int = 64, max_images: int = 2, vocab: int = 256,
                    image_token_id: int = 3, num_sources: int = 2, image_size: int = IMAGE_SIZE) -> Batch:
  """A batch obeying the trainer's contract: two packed segments per row, K placeholders per real tile, padding.

  The loss mask is 0 on padding, on targets that are image placeholders and on a few "prompt" tokens.
  """
  rng = np.random.default_rng(seed)
  tokens = np.zeros((batch, seq_len), np.int32)
  targets = np.zeros((batch, seq_len), np.int32)
  loss_mask = np.zeros((batch, seq_len), np.float32)
  segment_ids = np.zeros((batch, seq_len), np.int32)
  positions = np.zeros((batch, seq_len), np.int32)
  source_ids = np.full((batch, seq_len), -1, np.int32)
  images = rng.integers(0, 256, (batch, max_images, image_size, image_size, 3), dtype=np.uint8)
  image_mask = np.zeros((batch, max_images), bool)
  for b in range(batch):
    first = int(rng.integers(seq_len // 3, seq_len // 2))
    second = int(rng.integers(seq_len // 4, seq_len - first))  # the rest of the row is padding
    start = 0
    for seg, length in enumerate((first, second)):
      ids = rng.integers(image_token_id + 1, vocab, length + 1).astype(np.int32)
      tile = seg if b % 3 else None  # every third row has no image at all
      if tile is not None and tile < max_images:
        ids[1:1 + TOKENS_PER_TILE] = image_token_id
        image_mask[b, tile] = True
      sl = slice(start, start + length)
      tokens[b, sl], targets[b, sl] = ids[:-1], ids[1:]
      loss_mask[b, sl] = (ids[1:] != image_token_id) & (np.arange(length) >= 2)  # first two: "prompt"
      segment_ids[b, sl] = seg + 1
      positions[b, sl] = np.arange(length)
      source_ids[b, sl] = (b + seg) % num_sources
      start += length
  return Batch(tokens=tokens, targets=targets, loss_mask=loss_mask, segment_ids=segment_ids, positions=positions,
               images=images, image_mask=image_mask, source_ids=source_ids)


def flat(tree) -> dict[str, np.ndarray]:
  """{'decoder/embedding': array, ...} of a params (pure dict or nnx.State) tree, on the host."""
  from mm15_jax.train import optim
  tree = nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
  return {optim.path_str(p): np.asarray(jax.device_get(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  from jax.experimental.compilation_cache import compilation_cache as cc
  directory = tmp_path_factory.getbasetemp() / "jax_cache"  # one per session, shared by every test file
  directory.mkdir(exist_ok=True)
  directory = str(directory)
  saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                               "jax_persistent_cache_min_compile_time_secs",
                                               "jax_persistent_cache_min_entry_size_bytes")}
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  cc.reset_cache()  # in case an earlier test already initialised it without a directory
  yield directory
  for k, v in saved.items():
    jax.config.update(k, v)
  cc.reset_cache()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> str:
  from mm15_jax.data import synth
  out = tmp_path_factory.mktemp("corpus")
  synth.build_corpus(out, seed=0, scale=0.02, progress=None)
  return str(out)


def tiny_experiment(data_dir: str, *, steps: int = 4, seq_len: int = 128) -> Experiment:
  """configs/tiny with the model shrunk and stage 1 at 16 px tiles, 128 tokens, batch 8, logging every step.

  Stage 1 reads captions and text only: the synthetic interleaved documents are longer than 128 tokens.
  """
  from mm15_jax.configs import tiny
  exp = tiny.get_config(data_dir, scale=0.01)
  exp.model = tiny_model(vocab_size=0)  # the tokenizer's vocabulary
  pretrain, ocr = exp.stages[0], exp.stages[1]
  pretrain.data.mixture = {"caption": 1.0, "text": 1.0}
  for stage, size in ((pretrain, IMAGE_SIZE), (ocr, 2 * IMAGE_SIZE)):
    stage.image_size = size
    stage.data.seq_len = seq_len
    stage.batch_size, stage.steps, stage.log_every, stage.checkpoint_every = 8, steps, 1, 1000
  ocr.data.max_images = 5
  exp.stages = [pretrain, ocr]
  exp.mesh = MeshConfig(data=-1)
  return exp


def with_stage(exp: Experiment, index: int, **changes) -> Experiment:
  """A copy of `exp` with stage `index` changed."""
  import copy
  exp = copy.deepcopy(exp)
  exp.stages[index] = dataclasses.replace(exp.stages[index], **changes)
  return exp


BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def load_bench(name: str):
  """The script bench/<name>.py as a module (bench/ is not a package)."""
  spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH_DIR, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
  spec.loader.exec_module(module)
  return module


def dot_operand_types(hlo: str) -> list[tuple[str, str]]:
  """(lhs, rhs) element types of every dot in compiled HLO text."""
  types = []
  for computation in re.split(r"\n(?=\S)", hlo):
    defined = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", computation))
    for lhs, rhs in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", computation):
      types.append((defined.get(lhs), defined.get(rhs)))
  return types


def run_bench_main(bench, argv: list[str]) -> tuple[dict, list[str]]:
  """(result, printed lines) of a torch-comparing bench script's `main(argv)`; torch's thread count, which the
  scripts set, is restored afterwards."""
  import contextlib
  import io

  import torch
  threads, out = torch.get_num_threads(), io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      result = bench.main(argv)
  finally:
    torch.set_num_threads(threads)
  return result, out.getvalue().strip().splitlines()
