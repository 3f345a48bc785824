"""MM1.5-Video at CPU scale: the tiny demo's SFT checkpoint fine-tuned on the synthetic video QA clips.

    mm15 train --config tiny_video --workdir runs/demo_video

Needs the image demo's SFT checkpoint (`mm15 demo --workdir runs/demo`, or `--arg init_from=DIR`) and the video
datasets next to its corpus (`mm15 data synth --out runs/demo/data --video`: same tokenizer). Each clip is 6 frames
(data.video.frames) of 32x32, the tiny model's stage-1 tile size (16 tokens per frame, never split), with timestamps;
a 768-token row holds about three clips.

Training-free evaluation of the image model on the held-out clips, then of the fine-tuned one:
    mm15 eval --config tiny_video --checkpoint runs/demo/sft/checkpoints --out runs/demo_video/free \
        --benchmarks video_qa
    mm15 eval --config tiny_video --workdir runs/demo_video --benchmarks video_qa
The learning rate is scaled up for a model this small, as in configs/tiny.py's SFT stage. What the video model
needs is clips seen: 150 steps of 512-token rows (about 1700 clips) stayed at the blind level, 250 steps of 768-token
rows (about 6000 clips) do not.
"""
from __future__ import annotations

import os

from mm15_jax.config import DataConfig, Experiment, MeshConfig, SplitConfig, StageConfig, VideoConfig
from mm15_jax.configs import presets, tiny


def get_config(data_dir: str = "runs/demo/data", init_from: str = "runs/demo/sft/checkpoints",
               scale: float = 1.0, frames: int = 6) -> Experiment:
  """`scale` multiplies the step count (tests use a small one)."""
  data = DataConfig(data_dir=data_dir, tokenizer=os.path.join(data_dir, "tokenizer.model"),
                    mixture={"video_qa": 1.0}, split=SplitConfig(mode="none"),
                    seq_len=768, max_images=4 * frames, video=VideoConfig(frames=frames))
  video_sft = StageConfig(
      name="video_sft", image_size=tiny.STAGE1_SIZE, steps=max(2, round(250 * scale)), batch_size=8,
      learning_rate=1e-3, warmup_fraction=0.05, init_from=init_from, log_every=10, checkpoint_every=100, data=data)
  return Experiment(name="tiny-video", model=presets.tiny(), stages=[video_sft], mesh=MeshConfig(data=-1))
