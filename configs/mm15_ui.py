"""MM1.5-UI at paper scale: further SFT of an MM1.5 checkpoint on mobile-UI data with the SFT hyperparameters.

    mm15 train --config mm15_ui --arg init_from=gs://BUCKET/runs/3b/sft/checkpoints --arg size=3b \
        --arg data_dir=gs://BUCKET/data --workdir gs://BUCKET/runs/3b-ui

Data: the UI datasets under data_dir, from `mm15 data synth --ui --ui-size phone` (1080x1920 screens) and/or RICO-style
view hierarchies converted with `mm15 data convert --format rico` (pass `--arg sources='{"rico_ui": 1.0}'` for
other dataset names and weights). Hyperparameters are the SFT stage's of configs/mm15.py: dynamic split (4, 9) of
672-pixel tiles, batch 256, AdaFactor-style peak LR 1e-5 with cosine decay to 0, 1% warmup, one epoch, loss on
answer tokens only; the mesh and grad_accum of configs/mm15.py's stage 3 for the slice (`--arg slice=v6e-256`).
"""
from __future__ import annotations

import dataclasses

from mm15_jax.config import Experiment
from mm15_jax.configs import mm15
from mm15_jax.data import synth_ui


def get_config(data_dir: str = "data", size: str = "3b", init_from: str = "",
               sources: dict[str, float] | None = None, slice: str = "v5p-128") -> Experiment:
  if not init_from:
    raise ValueError("configs/mm15_ui.py: pass the MM1.5 checkpoint to start from, "
                     "--arg init_from=WORKDIR/sft/checkpoints")
  base = mm15.get_config(data_dir=data_dir, size=size, slice=slice)
  sft = base.stages[-1]
  stage = dataclasses.replace(sft, name="sft_ui", init_from=init_from,
                              data=dataclasses.replace(sft.data, mixture=synth_ui.ui_mixture(sources)))
  return dataclasses.replace(base, name=f"mm15-ui-{size}", stages=[stage])
