"""MM1.5-UI with the tiny model on CPU: further SFT of the demo's SFT checkpoint on the synthetic UI datasets.

    mm15 data synth --out runs/demo/data --ui
    mm15 train --config tiny_ui --set data_dir=runs/demo/data --workdir runs/demo_ui
    mm15 eval --config tiny_ui --workdir runs/demo_ui --benchmarks ui_ocr,ui_widget,ui_icon,ui_ground,ui_describe

The starting checkpoint is the image demo's last stage (`--arg init_from=DIR` for another); the stage keeps that
stage's hyperparameters (tile size, dynamic split, learning rate, batch), as MM1.5-UI keeps the SFT ones. The
corpus must be built with `--ui` (the UI text is then part of the tokenizer the image demo trains with).
"""
from __future__ import annotations

import dataclasses

from mm15_jax.config import Experiment
from mm15_jax.configs import tiny
from mm15_jax.data import synth_ui


def get_config(data_dir: str = "runs/demo/data", init_from: str = "runs/demo/sft/checkpoints",
               scale: float = 1.0) -> Experiment:
  base = tiny.get_config(data_dir=data_dir, scale=scale)
  sft = base.stages[-1]
  stage = dataclasses.replace(
      sft, name="sft_ui", init_from=init_from, steps=max(2, round(150 * scale)),
      data=dataclasses.replace(sft.data, mixture=synth_ui.ui_mixture()))
  return dataclasses.replace(base, name="tiny-ui", stages=[stage])
