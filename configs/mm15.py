"""The MM1.5 recipe at paper scale: three stages on the paper's data mixtures, batch sizes and learning rates.

    mm15 train --config mm15 --arg size=3b-moe --arg data_dir=gs://BUCKET/data --workdir gs://BUCKET/runs/3b-moe

Sized for one v5p-128 slice (v5p:4x4x4, 64 chips of 95 GiB): every preset and stage fits as shipped,
    mm15 aot --config mm15 --arg size=3b-moe --topology v5p:4x4x4
or, with `--arg slice=v6e-256`, for one v6e-256 slice (v6e:16x16, 256 chips of 32 GiB): one row of 4096 tokens per
chip in stages 2 and 3, two in stage 1, no gradient accumulation,
    mm15 aot --config mm15 --arg size=3b --arg slice=v6e-256 --stage sft --topology v6e:16x16

Stage 1: 378px, caption : interleaved : text = 50 : 10 : 40, batch 512, 200k steps.
Stage 2: 4 OCR sources in equal numbers per batch, static split (4 tiles of 672 + overview), batch 256,
         AdaFactor, peak LR 1e-5, cosine to 0, 30k steps.
Stage 3: SFT "all" mixture, dynamic split (4, 9), batch 256, AdaFactor, peak LR 1e-5, cosine to 0, one epoch
         (steps resolved at start from the datasets' sizes and the measured samples per packed row; the 23k
         steps stand for tools that do not read the data, e.g. `mm15 aot`).
A batch of 256 is 256 packed rows of 4096 tokens, each holding several samples (the start-up line of an epochs
stage prints how many).
Every stage warms up linearly over its first 1% of steps (the paper gives no warmup length).
The stage-1 learning rate is not given by MM1.5; we keep MM1's order of magnitude (configurable).
"""
from __future__ import annotations

import dataclasses
import os

from mm15_jax.config import DataConfig, Experiment, MeshConfig, SplitConfig, StageConfig
from mm15_jax.configs import presets
from mm15_jax.data import mixture

# Tile slots per 4096-token row in stages 2 and 3: as many as 144-token tiles fit (4096 // 144), so the token budget,
# not the slots, closes a row (with 20 slots SFT rows ran out of slots at 0.69 of their tokens).
TILE_SLOTS = 28

# Micro-steps per stage (pretrain, ocr, sft) that fit each preset on v5p-128 (BENCHMARKS section 7). With splash
# attention (model.attention=auto on TPU) 1B, 3B, 7B and 1B-MoE fit every stage at once (stage 3: 48.0 / 48.6 / 52.6
# / 78.7 GiB; stage 2 has the same shapes); 3B-MoE, its 64 experts spread over an expert axis of 8 (EXPERT_AXIS),
# fits every stage at 2 (stage 1: 65.9 GiB, stage 3: 69.5 GiB). 30B fits stage 1 at 1 (70.3 GiB); in stages 2 and 3
# the 672 px tiles' ViT-H activations need half the rows per chip at once (81.9 GiB at 1, over the 80 GiB aim).
GRAD_ACCUM = {"1b": (1, 1, 1), "3b": (1, 1, 1), "7b": (1, 1, 1), "30b": (1, 2, 2), "1b-moe": (1, 1, 1),
              "3b-moe": (2, 2, 2)}
# The slices the recipe is sized for -> micro-steps per stage for each preset (missing: 1 in every stage). On
# v6e-256 the paper's batch of 256 rows is one row per chip in stages 2 and 3, so there is nothing to accumulate;
# BENCHMARKS section 7 has the compiles.
SLICES = {"v5p-128": GRAD_ACCUM, "v6e-256": {}}
# Expert-parallel mesh axis per MoE preset (the rest of the chips shard the weights, fsdp): each chip holds
# 64 / EXPERT_AXIS of every MoE layer's experts and tokens reach them by all-to-all. 1B-MoE fits without one.
EXPERT_AXIS = {"3b-moe": 8}


def get_config(data_dir: str = "data", size: str = "3b", slice: str = "v5p-128") -> Experiment:
  if slice not in SLICES:
    raise ValueError(f"slice={slice!r}: the recipe is sized for {sorted(SLICES)}")
  tok = os.path.join(data_dir, "tokenizer.model")

  def data(mix, split, max_images, **kw):
    return DataConfig(data_dir=data_dir, tokenizer=tok, mixture=mix, split=split, seq_len=4096,
                      max_images=max_images, num_workers=8, **kw)

  pretrain = StageConfig(
      name="pretrain", image_size=378, steps=200_000, batch_size=512, learning_rate=1e-4,
      checkpoint_every=2000, data=data(mixture.stage1_mixture(), SplitConfig(mode="none"), 16))
  ocr = StageConfig(
      name="ocr", image_size=672, steps=30_000, batch_size=256, learning_rate=1e-5, init_from="previous",
      warmup_fraction=0.01, end_lr_fraction=0.0,
      checkpoint_every=1000,
      data=data({s: 1.0 for s in mixture.STAGE2_SOURCES}, SplitConfig(mode="static"), TILE_SLOTS,
                equal_sources=True))
  sft = StageConfig(
      name="sft", image_size=672, steps=23_000, batch_size=256, learning_rate=1e-5, init_from="previous",
      warmup_fraction=0.01, end_lr_fraction=0.0, epochs=1.0,
      checkpoint_every=1000,
      data=data(mixture.sft_mixture("all"), SplitConfig(mode="dynamic", n_min=4, n_max=9),
                TILE_SLOTS))
  accum = SLICES[slice].get(size, (1, 1, 1))
  stages = [dataclasses.replace(s, grad_accum=n) for s, n in zip([pretrain, ocr, sft], accum)]
  return Experiment(name=f"mm15-{size}", model=presets.get(size), stages=stages,
                    mesh=MeshConfig(data=1, fsdp=-1, expert=EXPERT_AXIS.get(size, 1)))
