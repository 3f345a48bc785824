"""Synthetic video QA (MM1.5-Video): short rendered clips and multiple-choice questions about what happens in them.

A clip is FRAMES frames of FRAME_SIZE pixels at FPS frames per second (stored as PNG frames with their timestamps,
data/video.py's "frames" form) showing shapes of distinct colours (synth_scenes' palette) on a plain background.
Each clip has one event story and one question about it:
  direction    one object moves across the frame          "Which way does the red circle move?"
  order        two objects appear one after the other    "Which appears first, the red circle or the blue square?"
  colour       an object changes colour mid-clip          "What colour does the square turn?" / "... at the start?"
  count        objects appear one by one                  "How many objects are there at 2.5s?" / "... at the end?"
  before_after an object appears, another changes colour  "Does the blue square appear before or after ...?"
Questions list their options (the layout of `mm15 eval import`'s multiple-choice benchmarks: "A. left\nB. right
...") in a fixed order per task - directions, the whole palette, counts, before/after - or, for order, the two
objects in the order the question names them; they are answered with the option's letter: training records carry
the letter as the assistant turn, held-out ("test") records as the reference of the "mc" metric, with the task as
their subset. Fixed options keep the letter a function of what the clip shows, which a model this small learns in
the demo's budget; options drawn per clip add a lookup it does not.
No single frame answers the motion, order and before/after questions: the model has to compare frames.
"""
from __future__ import annotations

import string

import numpy as np
from PIL import Image, ImageDraw

from mm15_jax.data import records
from mm15_jax.data import synth_scenes
from mm15_jax.eval.suites import MC_INSTRUCTION

FRAMES = 6
FPS = 2.0
FRAME_SIZE = 32
OBJECT_SIZE = 9
SOURCE, CATEGORY = "video_qa", "video"
TASKS = ("direction", "order", "colour", "count", "before_after")
DIRECTIONS = ("left", "right", "up", "down")
COLOR_NAMES = tuple(synth_scenes.COLORS)


def _objects(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
  """n (colour, shape) pairs, each colour and each shape used once."""
  colours = [COLOR_NAMES[i] for i in rng.choice(len(COLOR_NAMES), size=n, replace=False)]
  shapes = [synth_scenes.SHAPES[i] for i in rng.choice(len(synth_scenes.SHAPES), size=n, replace=False)]
  return list(zip(colours, shapes))


def _cells(rng: np.random.Generator, n: int) -> list[tuple[float, float]]:
  """Top-left corners of n objects on distinct cells of a 3x3 layout."""
  step = (FRAME_SIZE - OBJECT_SIZE) / 2
  return [(step * (c % 3), step * (c // 3)) for c in rng.choice(9, size=n, replace=False)]


def _render(rng: np.random.Generator, frames: list[list[tuple[str, str, float, float]]]) -> list[bytes]:
  """Per frame, (colour, shape, x, y) of the objects shown -> PNG frames on one background."""
  background = synth_scenes.BACKGROUNDS[rng.integers(len(synth_scenes.BACKGROUNDS))]
  out = []
  for shown in frames:
    image = Image.new("RGB", (FRAME_SIZE, FRAME_SIZE), background)
    draw = ImageDraw.Draw(image)
    for colour, shape, x, y in shown:
      synth_scenes._draw_shape(draw, shape, x, y, OBJECT_SIZE, synth_scenes.COLORS[colour])
    out.append(synth_scenes.png_bytes(image))
  return out


def _direction(rng):
  (colour, shape), (other_colour, other_shape) = _objects(rng, 2)
  direction = DIRECTIONS[rng.integers(4)]
  lo, hi, across = 1.0, FRAME_SIZE - OBJECT_SIZE - 1.0, float(rng.uniform(1, FRAME_SIZE - OBJECT_SIZE - 1))
  start, end = (hi, lo) if direction in ("left", "up") else (lo, hi)
  still = _cells(rng, 1)[0]
  frames = []
  for k in range(FRAMES):
    along = start + (end - start) * k / (FRAMES - 1)
    x, y = (along, across) if direction in ("left", "right") else (across, along)
    frames.append([(other_colour, other_shape, *still), (colour, shape, x, y)])
  return frames, f"Which way does the {colour} {shape} move?", list(DIRECTIONS), direction


def _appearances(rng, n, first_frame=0):
  """n objects on distinct cells appearing at distinct, increasing frames (>= first_frame)."""
  objects, cells = _objects(rng, n), _cells(rng, n)
  starts = sorted(int(f) for f in rng.choice(np.arange(first_frame, FRAMES - 1), size=n, replace=False))
  return objects, cells, starts


def _order(rng):
  objects, cells, starts = _appearances(rng, 2)
  frames = [[(c, s, *cell) for (c, s), cell, t in zip(objects, cells, starts) if t <= k] for k in range(FRAMES)]
  names = [f"{c} {s}" for c, s in objects]  # in order of appearance
  options = names if rng.random() < 0.5 else names[::-1]
  which = "first" if rng.random() < 0.5 else "last"
  question = f"Which appears {which}, the {options[0]} or the {options[1]}?"
  return frames, question, options, names[0] if which == "first" else names[-1]


def _colour(rng):
  (before, shape), = _objects(rng, 1)
  after = COLOR_NAMES[(COLOR_NAMES.index(before) + int(rng.integers(1, len(COLOR_NAMES)))) % len(COLOR_NAMES)]
  change = int(rng.integers(2, FRAMES - 1))
  cell = _cells(rng, 1)[0]
  frames = [[(before if k < change else after, shape, *cell)] for k in range(FRAMES)]
  if rng.random() < 0.5:
    return frames, f"What colour does the {shape} turn?", list(COLOR_NAMES), after
  return frames, f"What colour is the {shape} at the start?", list(COLOR_NAMES), before


def _count(rng):
  n = int(rng.integers(1, 5))
  objects, cells, starts = _appearances(rng, n)
  frames = [[(c, s, *cell) for (c, s), cell, t in zip(objects, cells, starts) if t <= k] for k in range(FRAMES)]
  options = list(synth_scenes.NUMBER_WORDS[1:5])
  if rng.random() < 0.5:
    return frames, "How many objects are there at the end?", options, synth_scenes.NUMBER_WORDS[n]
  k = int(rng.integers(starts[0], FRAMES))  # a frame with at least one object
  shown = sum(t <= k for t in starts)
  return frames, f"How many objects are there at {k / FPS:.1f}s?", options, synth_scenes.NUMBER_WORDS[shown]


def _before_after(rng):
  (appear_colour, appear_shape), (colour, shape) = _objects(rng, 2)
  after = next(c for c in COLOR_NAMES[int(rng.integers(len(COLOR_NAMES))):] + COLOR_NAMES
               if c not in (colour, appear_colour))
  appear, change = (int(f) for f in rng.choice(np.arange(1, FRAMES), size=2, replace=False))
  cells = _cells(rng, 2)
  frames = []
  for k in range(FRAMES):
    shown = [(colour if k < change else after, shape, *cells[1])]
    if k >= appear:
      shown.append((appear_colour, appear_shape, *cells[0]))
    frames.append(shown)
  question = f"Does the {appear_colour} {appear_shape} appear before or after the {shape} turns {after}?"
  return frames, question, ["before", "after"], "before" if appear < change else "after"


MAKERS = {"direction": _direction, "order": _order, "colour": _colour, "count": _count,
          "before_after": _before_after}


def multiple_choice(question: str, options: list[str], answer: str) -> tuple[str, str]:
  """(question with lettered options and the instruction, the answer's letter)."""
  letters = string.ascii_uppercase[:len(options)]
  lines = "\n".join(f"{letter}. {option}" for letter, option in zip(letters, options))
  return f"{question}\n{lines}\n{MC_INSTRUCTION}", letters[options.index(answer)]


def make_video_qa(rng: np.random.Generator, split: str) -> dict:
  """One clip and its question: an sft record (train) or a held-out "mc" record (test)."""
  task = TASKS[rng.integers(len(TASKS))]
  frames, question, options, answer = MAKERS[task](rng)
  text, letter = multiple_choice(question, options, answer)
  record = {"kind": "sft", "source": SOURCE, "category": CATEGORY, "images": _render(rng, frames),
            "video": {"form": "frames", "timestamps": [k / FPS for k in range(FRAMES)]}}
  user = {"role": "user", "content": f"{records.VIDEO_MARKER}\n{text}"}
  if split == "test":
    return {**record, "messages": [user], "answers": [letter], "metric": "mc", "subset": task}
  return {**record, "messages": [user, {"role": "assistant", "content": letter}]}


# name -> (maker, train records at scale 1, test records at scale 1).
DATASETS = {SOURCE: (make_video_qa, 2000, 200)}
