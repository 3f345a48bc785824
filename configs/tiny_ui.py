"""MM1.5-UI with the tiny model on CPU: further SFT of the tiny recipe's SFT checkpoint on the synthetic UI datasets.

    mm15 data synth --out runs/ui/data --ui
    mm15 train --config tiny --arg data_dir=runs/ui/data --workdir runs/ui
    mm15 train --config tiny_ui --workdir runs/ui
    mm15 eval --config tiny_ui --workdir runs/ui --max-new-tokens 64 \
        --benchmarks ui_ocr,ui_widget,ui_icon,ui_ground,ui_describe

The corpus is built with `--ui` before the image recipe trains, so that its tokenizer knows the UI text (the
image recipe itself leaves the ui_* datasets out of its mixtures: their category "ui" is in none of them). The
UI stage starts from the image recipe's last checkpoint (`--arg init_from=DIR` for another, `--arg data_dir=DIR`
for another corpus) and keeps that stage's hyperparameters (tile size, dynamic split, learning rate, batch), as
MM1.5-UI keeps the SFT ones. Screen descriptions run to about 30 tokens, hence --max-new-tokens 64.
"""
from __future__ import annotations

import dataclasses

from mm15_jax.config import Experiment
from mm15_jax.configs import tiny
from mm15_jax.data import synth_ui


def get_config(data_dir: str = "runs/ui/data", init_from: str = "runs/ui/sft/checkpoints",
               scale: float = 1.0) -> Experiment:
  base = tiny.get_config(data_dir=data_dir, scale=scale)
  sft = base.stages[-1]
  stage = dataclasses.replace(
      sft, name="sft_ui", init_from=init_from, steps=max(2, round(150 * scale)),
      data=dataclasses.replace(sft.data, mixture=synth_ui.ui_mixture(), seq_len=512))  # widget lists: ~400 tokens
  return dataclasses.replace(base, name="tiny-ui", stages=[stage])
