"""`mm15 generate`: ask a checkpoint about images from the command line, the answer streamed to the terminal.

    mm15 generate --checkpoint runs/demo/sft/checkpoints --image a.jpg [--image b.jpg ...] \
        --prompt "Where is the cat?" [--config tiny --stage sft --set ...] [--n-max 16] [--max-new-tokens 128] \
        [--temperature 0.7 --top-p 0.9] [--draw out.png]

The prompt is formatted as the stage's training prompts are (the tokenizer's chat template, one user turn; an
"<image>" line per image comes first unless the prompt places its own "<image>" marks) and images are split as the
stage splits them (`--n-max` raises the dynamic split's largest grid, up to 16). Greedy unless `--temperature` > 0
(then nucleus sampling with `--top-p`). `--draw` writes the first image with the answer's boxes "[x1, y1, x2, y2]"
and points "[x, y]" (0..1000 grid of the whole image) drawn on it.
"""
from __future__ import annotations

import re
import sys
from typing import TextIO

import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from mm15_jax import sharding
from mm15_jax.config import Experiment
from mm15_jax.data import images as images_lib
from mm15_jax.data import samples as samples_lib
from mm15_jax.data.tokenizer import IMAGE_MARK, Tokenizer
from mm15_jax.eval import generate, metrics
from mm15_jax.eval import run as eval_run

_POINT = re.compile(r"\[\s*([+-]?\d+(?:\.\d+)?)\s*,\s*([+-]?\d+(?:\.\d+)?)\s*\]")


def read_images(paths: list[str], max_pixels: int) -> list[bytes]:
  """Encoded bytes of each image, decoded once here so that a bad file is named before the model loads."""
  raws = []
  for path in paths:
    try:
      raw = epath.Path(path).read_bytes()
    except OSError as e:
      raise ValueError(f"--image {path}: cannot be read ({e.strerror or e})") from e
    images_lib.decode_image(raw, max_pixels=max_pixels, where=f"--image {path}")
    raws.append(raw)
  return raws


def prompt_record(prompt: str, raws: list[bytes]) -> dict:
  content = prompt if IMAGE_MARK in prompt else f"{IMAGE_MARK}\n" * len(raws) + prompt
  return {"kind": "sft", "images": raws, "messages": [{"role": "user", "content": content}]}


def draw_answer(raw: bytes, answer: str, out_path: str, max_pixels: int) -> int:
  """Writes the image with the answer's boxes and points drawn; returns how many shapes were drawn."""
  pixels = images_lib.decode_image(raw, max_pixels=max_pixels, where="--draw image")
  image = Image.fromarray(pixels)
  h, w = pixels.shape[:2]
  pen = ImageDraw.Draw(image)
  width = max(2, min(w, h) // 150)
  boxes = metrics.parse_boxes(answer)
  for x1, y1, x2, y2 in boxes:
    pen.rectangle([x1 * w / metrics.GRID, y1 * h / metrics.GRID, x2 * w / metrics.GRID, y2 * h / metrics.GRID],
                  outline=(255, 40, 40), width=width)
  points = [(min(max(float(x), 0.0), metrics.GRID), min(max(float(y), 0.0), metrics.GRID))
            for x, y in _POINT.findall(answer)]  # exactly two numbers: boxes do not match
  for x, y in points:
    cx, cy, r = x * w / metrics.GRID, y * h / metrics.GRID, 2 * width
    pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(40, 220, 40), outline=(0, 0, 0))
  epath.Path(out_path).parent.mkdir(parents=True, exist_ok=True)
  with epath.Path(out_path).open("wb") as f:
    image.save(f, format="PNG")
  return len(boxes) + len(points)


class _Printer:
  """Prints the text of a growing token list as it grows (a piece that decodes to an incomplete character waits)."""

  def __init__(self, tokenizer: Tokenizer, out: TextIO):
    self.tok, self.out, self.ids, self.shown = tokenizer, out, [], ""

  def add(self, token: int) -> None:
    self.ids.append(token)
    text = self.tok.decode(self.ids)
    if not text.endswith("\ufffd") and text.startswith(self.shown):
      self.out.write(text[len(self.shown):])
      self.out.flush()
      self.shown = text

  def finish(self) -> str:
    text = self.tok.decode(self.ids)
    self.out.write(text[len(self.shown):] + "\n")
    self.out.flush()
    return text


def ask(exp: Experiment, checkpoint: str, image_paths: list[str], prompt: str, *, stage: int | str = -1,
        n_max: int | None = None, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
        seed: int = 0, draw: str = "", out: TextIO = sys.stdout) -> str:
  """Streams the answer to `out` and returns it (see the module docstring)."""
  stage_cfg = eval_run._stage(exp, stage)
  data_cfg = stage_cfg.data
  if draw and not image_paths:
    raise ValueError("--draw needs an --image to draw on")
  raws = read_images(image_paths, data_cfg.max_image_pixels)  # before the model loads: a bad file fails fast
  tokenizer = Tokenizer(data_cfg.tokenizer)
  mesh = sharding.make_mesh(exp.mesh)
  model, model_cfg = eval_run.load_model(checkpoint, mesh, exp.seed)
  spec = eval_run.eval_spec(data_cfg, tile_size=stage_cfg.image_size,
                            tokens_per_tile=model_cfg.tokens_per_tile, n_max=n_max)
  sample = samples_lib.encode_prompt(prompt_record(prompt, raws), tokenizer, spec, n_max=n_max, where="--prompt")
  n = max(sample.n_tiles, 1)
  images = np.zeros((1, n, spec.tile_size, spec.tile_size, 3), np.uint8)
  extent = np.zeros((1, n, 4), np.int32) if spec.split.enlarge_on_device else None
  sample.write_tiles(images[0, :sample.n_tiles], None if extent is None else extent[0, :sample.n_tiles])
  image_mask = np.arange(n)[None] < sample.n_tiles
  printer = _Printer(tokenizer, out)
  with sharding.use_mesh(mesh):
    tokens = generate.stream_generate(
        model, sample.ids[None], images, image_mask, image_token_id=tokenizer.image_id,
        stop_ids={tokenizer.end_id, tokenizer.eos_id}, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, seed=seed, image_extent=extent)
    for token in tokens:
      printer.add(token)
  answer = printer.finish()
  if draw:
    shapes = draw_answer(raws[0], answer, draw, spec.max_pixels)
    print(f"[generate] {shapes} boxes/points drawn -> {draw}", file=sys.stderr)
  return answer
