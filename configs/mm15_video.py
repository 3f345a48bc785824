"""MM1.5-Video: an MM1.5 checkpoint on video frames, training-free or fine-tuned on video QA with the SFT recipe.

    mm15 train --config mm15_video --arg size=3b --arg data_dir=gs://BUCKET/data \
        --arg init_from=gs://BUCKET/runs/3b/sft/checkpoints --workdir gs://BUCKET/runs/3b-video

A video is 24 uniformly sampled frames (data.video.frames), in temporal order, each one 378x378 image (the stage-1
tile size; never split) = 144 tokens, numbered by the image-index tokens and preceded by its timestamp (data/video.py,
data/samples.py): a 24-frame video takes ~3.5k of the 4096 tokens of a row.

Training-free (the image model applied to frames), on benchmarks imported with `mm15 eval import --format videomme`
(or video_mc):
    mm15 eval --config mm15_video --checkpoint gs://BUCKET/runs/3b/sft/checkpoints --out runs/3b-video-free \
        --data-dir gs://BUCKET/data --benchmarks Video-MME
(the encoder's position embeddings, trained at 672 in stages 2-3, are interpolated to 378 on the fly.)

Video SFT (stage "video_sft"): initialised from the MM1.5 SFT checkpoint (`init_from`), the SFT hyperparameters
(batch 256 rows of 4096 tokens, AdaFactor, peak LR 1e-5, 1% warmup, cosine decay to 0, one epoch, loss on answers
only), on the video datasets named by `mixture` (comma-separated, equal weights), e.g. LLaVA-Video converted by
    mm15 data convert --format llava-video --input LLaVA-Video-178K/*/*.json --image-root VIDEOS \
        --out gs://BUCKET/data --name video_sft --video-frames 24 --workers 32
The 23k steps stand for tools that do not read the data (`mm15 aot`); training resolves one epoch at start.
"""
from __future__ import annotations

import os

from mm15_jax.config import DataConfig, Experiment, MeshConfig, SplitConfig, StageConfig, VideoConfig
from mm15_jax.configs import presets

FRAME_SIZE = 378  # the stage-1 tile size: one 144-token encoding per frame
TILE_SLOTS = 28   # as configs/mm15.py: 4096 // 144 image slots per row


def get_config(data_dir: str = "data", size: str = "3b", init_from: str = "runs/mm15/sft/checkpoints",
               mixture: str = "video_sft", frames: int = 24) -> Experiment:
  names = [n.strip() for n in mixture.split(",") if n.strip()]
  if not names:
    raise ValueError("mm15_video: --arg mixture names no dataset")
  data = DataConfig(data_dir=data_dir, tokenizer=os.path.join(data_dir, "tokenizer.model"),
                    mixture={n: 1.0 for n in names}, split=SplitConfig(mode="none"),
                    seq_len=4096, max_images=TILE_SLOTS, num_workers=8, video=VideoConfig(frames=frames))
  video_sft = StageConfig(
      name="video_sft", image_size=FRAME_SIZE, steps=23_000, epochs=1.0, batch_size=256, learning_rate=1e-5,
      warmup_fraction=0.01, end_lr_fraction=0.0, init_from=init_from, checkpoint_every=1000, data=data)
  return Experiment(name=f"mm15-{size}-video", model=presets.get(size), stages=[video_sft],
                    mesh=MeshConfig(data=-1, fsdp=1))
