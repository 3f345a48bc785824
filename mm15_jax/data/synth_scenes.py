"""Synthetic scenes: 1-3 large shapes of distinct colours on a plain light background, on a coarse 3x3 layout.

Every object in a scene has a colour and a shape of its own, so "the red one" or "the circle" always names one
object. Boxes come from the drawn pixels (each shape is also drawn into its own mask), mapped to the 0..1000 grid
of the whole image. Record makers here: caption, interleaved, sft_general, sft_refer_ground, sft_multi_image.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 195, 0),
    "purple": (140, 40, 180),
}
SHAPES = ("circle", "square", "triangle", "diamond")
BACKGROUNDS = ((250, 250, 250), (238, 238, 238), (245, 240, 225), (230, 238, 245), (240, 245, 232))
ROW_WORDS = ("top", "middle", "bottom")
COL_WORDS = ("left", "center", "right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ORDINALS = ("first", "second", "third", "fourth")


@dataclasses.dataclass
class Obj:
  color: str
  shape: str
  size: str  # "small" | "large"
  cell: tuple[int, int]  # (row, col) on the 3x3 layout
  box: tuple[int, int, int, int]  # x1, y1, x2, y2 on the 0..1000 grid of the whole image

  @property
  def name(self) -> str:
    return f"{self.color} {self.shape}"

  @property
  def position(self) -> str:
    r, c = self.cell
    return "center" if (r, c) == (1, 1) else f"{ROW_WORDS[r]} {COL_WORDS[c]}"

  @property
  def center(self) -> tuple[int, int]:
    x1, y1, x2, y2 = self.box
    return round((x1 + x2) / 2), round((y1 + y2) / 2)


@dataclasses.dataclass
class Scene:
  width: int
  height: int
  objects: list[Obj]
  png: bytes


def png_bytes(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="PNG", compress_level=6)
  return buf.getvalue()


def random_size(rng: np.random.Generator, lo: int = 96, hi: int = 320) -> tuple[int, int]:
  """(width, height): square, wide or tall, so that image splitting sees varied aspect ratios."""
  mode = rng.integers(3)
  long_side = int(rng.integers(lo + 64, hi + 1))
  short_side = int(rng.integers(lo, max(lo + 1, long_side * 2 // 3)))
  if mode == 0:
    return long_side, long_side
  return (long_side, short_side) if mode == 1 else (short_side, long_side)


def _polygon(shape: str, x0: float, y0: float, s: float) -> list[tuple[float, float]] | None:
  if shape == "triangle":
    return [(x0 + s / 2, y0), (x0 + s, y0 + s), (x0, y0 + s)]
  if shape == "diamond":
    return [(x0 + s / 2, y0), (x0 + s, y0 + s / 2), (x0 + s / 2, y0 + s), (x0, y0 + s / 2)]
  return None


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: float, y0: float, s: float, fill) -> None:
  if shape == "circle":
    draw.ellipse([x0, y0, x0 + s, y0 + s], fill=fill)
  elif shape == "square":
    draw.rectangle([x0, y0, x0 + s, y0 + s], fill=fill)
  else:
    draw.polygon(_polygon(shape, x0, y0, s), fill=fill)


def to_grid(x: float, extent: int) -> int:
  return int(round(x * 1000 / extent))


def random_scene(rng: np.random.Generator, *, n_objects: int | None = None, size: tuple[int, int] | None = None,
                 ) -> Scene:
  width, height = size or random_size(rng)
  n = int(n_objects if n_objects is not None else rng.integers(1, 4))
  cells = [divmod(int(i), 3) for i in rng.choice(9, size=n, replace=False)]
  colors = [list(COLORS)[i] for i in rng.choice(len(COLORS), size=n, replace=False)]
  shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), size=n, replace=False)]
  background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
  image = Image.new("RGB", (width, height), background)
  draw = ImageDraw.Draw(image)
  cell_w, cell_h = width / 3, height / 3
  objects = []
  for (row, col), color, shape in zip(cells, colors, shapes):
    size_word = "large" if rng.random() < 0.5 else "small"
    frac = rng.uniform(0.82, 0.95) if size_word == "large" else rng.uniform(0.55, 0.65)
    s = frac * min(cell_w, cell_h)
    # Jitter inside the cell, never crossing its border: neighbours stay apart.
    x0 = col * cell_w + rng.uniform(0, cell_w - s)
    y0 = row * cell_h + rng.uniform(0, cell_h - s)
    mask = Image.new("L", (width, height), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, x0, y0, s, 255)
    px1, py1, px2, py2 = mask.getbbox()  # pixel box, right/bottom exclusive
    _draw_shape(draw, shape, x0, y0, s, COLORS[color])
    box = (to_grid(px1, width), to_grid(py1, height), to_grid(px2, width), to_grid(py2, height))
    objects.append(Obj(color, shape, size_word, (row, col), box))
  # Reading order (top to bottom, left to right) makes captions and "first/second" unambiguous.
  objects.sort(key=lambda o: o.cell)
  return Scene(width, height, objects, png_bytes(image))


def box_text(box) -> str:
  return "[" + ", ".join(str(v) for v in box) + "]"


def _join(parts: list[str]) -> str:
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(scene: Scene, rng: np.random.Generator) -> str:
  n = len(scene.objects)
  style = rng.integers(4)
  if style == 3:  # grounded caption: boxes in text, as in grounded pretraining data
    items = [f"a {o.size} {o.name} {box_text(o.box)}" for o in scene.objects]
    return f"An image with {_join(items)}."
  if style == 0:
    items = [f"a {o.size} {o.name} at the {o.position}" for o in scene.objects]
    noun = "shape" if n == 1 else "shapes"
    return f"{NUMBER_WORDS[n].capitalize()} {noun} on a light background: {_join(items)}."
  if style == 1:
    items = [f"a {o.size} {o.name} in the {o.position}" for o in scene.objects]
    return f"A picture of {_join(items)}."
  sentences = [f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'}."]
  sentences += [f"The {o.shape} is {o.color} and {o.size}, at the {o.position}." for o in scene.objects]
  return " ".join(sentences)


def _record(kind: str, source: str, category: str = "", **fields) -> dict:
  return {"kind": kind, "source": source, "category": category, **fields}


def make_caption(rng: np.random.Generator, split: str) -> dict:
  del split
  scene = random_scene(rng)
  return _record("caption", "caption", text=describe(scene, rng), images=[scene.png])


def make_interleaved(rng: np.random.Generator, split: str) -> dict:
  del split
  scenes = [random_scene(rng) for _ in range(int(rng.integers(2, 5)))]
  segments: list = [f"This page shows {NUMBER_WORDS[len(scenes)]} pictures of shapes."]
  for i, scene in enumerate(scenes):
    segments.append(f"The {ORDINALS[i]} picture:")
    segments.append(i)
    segments.append(describe(scene, rng))
  counts = [len(s.objects) for s in scenes]
  best = int(np.argmax(counts))
  if counts.count(counts[best]) == 1:
    segments.append(f"The {ORDINALS[best]} picture has the most shapes, {NUMBER_WORDS[counts[best]]} in all.")
  else:
    segments.append(f"In total there are {sum(counts)} shapes in these pictures.")
  return _record("interleaved", "interleaved", segments=segments, images=[s.png for s in scenes])


def _general_qa(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
  obj = scene.objects[rng.integers(len(scene.objects))]
  kind = rng.integers(6)
  if kind == 0:
    return f"What color is the {obj.shape}?", obj.color
  if kind == 1:
    return f"What shape is {obj.color}?", obj.shape
  if kind == 2:
    return "How many shapes are there?", str(len(scene.objects))
  if kind == 3:
    return f"Is the {obj.name} large or small?", obj.size
  if kind == 4:
    return f"Where is the {obj.name}?", obj.position
  # Yes/no question, balanced between present and absent objects.
  if rng.random() < 0.5:
    return f"Is there a {obj.name}?", "yes"
  color = list(COLORS)[rng.integers(len(COLORS))]
  shape = SHAPES[rng.integers(len(SHAPES))]
  present = any(o.color == color and o.shape == shape for o in scene.objects)
  return f"Is there a {color} {shape}?", "yes" if present else "no"


def conversation(pairs: list[tuple[str, str]]) -> list[dict]:
  messages = []
  for i, (q, a) in enumerate(pairs):
    messages.append({"role": "user", "content": ("<image>\n" if i == 0 else "") + q})
    messages.append({"role": "assistant", "content": a})
  return messages


def held_out_record(source: str, category: str, question: str, answer: str, image: bytes, metric: str) -> dict:
  """A held-out record: one user turn (no answer in the messages), the reference in `answers`."""
  return _record("sft", source, category, messages=[{"role": "user", "content": "<image>\n" + question}],
                 images=[image], answers=[answer], metric=metric)


def make_sft_general(rng: np.random.Generator, split: str) -> dict:
  scene = random_scene(rng)
  if split == "test":
    q, a = _general_qa(scene, rng)
    return held_out_record("sft_general", "general", q, a, scene.png, "exact")
  pairs = [_general_qa(scene, rng) for _ in range(int(rng.integers(1, 4)))]
  return _record("sft", "sft_general", "general", messages=conversation(pairs), images=[scene.png])


def _ground_qa(scene: Scene, rng: np.random.Generator, kind: int) -> tuple[str, str]:
  obj = scene.objects[rng.integers(len(scene.objects))]
  if kind == 0:
    return f"Give the bounding box of the {obj.name}.", box_text(obj.box)
  if kind == 1:
    return f"What is at {box_text(obj.box)}?", f"a {obj.name}"
  if kind == 2:
    return f"What is at the point {box_text(obj.center)}?", f"a {obj.name}"
  return f"Give the center point of the {obj.name}.", box_text(obj.center)


def make_sft_refer_ground(rng: np.random.Generator, split: str) -> dict:
  scene = random_scene(rng, n_objects=int(rng.integers(1, 3)))  # one distractor at most: learnable in the demo
  if split == "test":
    q, a = _ground_qa(scene, rng, 0)
    return held_out_record("sft_refer_ground", "refer_ground", q, a, scene.png, "iou")
  # Grounding (box answers) is what the held-out split asks, so it gets half of the turns.
  kinds = [0 if rng.random() < 0.5 else int(rng.integers(1, 4)) for _ in range(int(rng.integers(1, 4)))]
  pairs = [_ground_qa(scene, rng, k) for k in kinds]
  return _record("sft", "sft_refer_ground", "refer_ground", messages=conversation(pairs), images=[scene.png])


def make_sft_multi_image(rng: np.random.Generator, split: str) -> dict:
  del split
  n_images = int(rng.integers(2, 4))
  words = ORDINALS[:n_images]
  if rng.random() < 0.5:
    # Distinct shape counts so "more"/"most" has one answer.
    counts = [int(c) for c in rng.choice(np.arange(1, 4), size=n_images, replace=False)]
    scenes = [random_scene(rng, n_objects=c) for c in counts]
    question = "Which image has more shapes?" if n_images == 2 else "Which image has the most shapes?"
    answer = f"the {words[int(np.argmax(counts))]} image"
  else:
    scenes = [random_scene(rng) for _ in range(n_images)]
    target = int(rng.integers(n_images))
    obj = scenes[target].objects[rng.integers(len(scenes[target].objects))]
    for i, scene in enumerate(scenes):  # redraw other scenes until only the target holds this object
      while i != target and any(o.name == obj.name for o in scene.objects):
        scene = scenes[i] = random_scene(rng)
    question = f"Which image contains a {obj.name}?"
    answer = f"the {words[target]} image"
  content = "<image>\n" * n_images + question
  return _record("sft", "sft_multi_image", "multi_image",
                 messages=[{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
                 images=[s.png for s in scenes])
