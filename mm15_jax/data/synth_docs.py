"""Synthetic text and text-in-image data: text documents, the four OCR sources and text-rich SFT.

OCR sources mirror the look of the real ones: ocr_pdfa (rendered document pages with paragraphs), ocr_idl
(scanned-looking forms: grey paper, noise, slight rotation), ocr_rendered_text (one line on a coloured or textured
background), ocr_docstruct (tables and key-value layouts). The record text is the transcription, one line per
rendered line.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mm15_jax.data.synth_scenes import COLORS, SHAPES, held_out_record, png_bytes

WORDS = (
    "the a of and to in is it that for on with as by at from this are was be or an have has not will can all "
    "data report page table value total year month time system model image text number line form name date "
    "account amount price item order list note section result method study test sample group rate level "
    "water light color shape circle square red green blue yellow small large first second new old high low "
    "open close start end left right top bottom north south east west city river market school office road"
).split()
NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Laura", "Mark")
SURNAMES = ("Smith", "Jones", "Brown", "Taylor", "Wilson", "Clark", "Hall", "Young", "King", "Wright")
CITIES = ("Boston", "Denver", "Austin", "Paris", "Berlin", "Madrid", "Oslo", "Tokyo", "Lima", "Cairo")
SIGN_WORDS = ("STOP", "OPEN", "EXIT", "CAFE", "HOTEL", "BANK", "SALE", "TAXI", "PARK", "BUS", "MENU", "SHOP",
              "PIZZA", "BOOK", "MILK", "BREAD", "TEA", "GAME", "MUSIC", "LIBRARY", "MARKET", "POST", "FIRE",
              "POLICE")


@functools.lru_cache(maxsize=None)
def font(size: int) -> ImageFont.ImageFont:
  """Pillow's bundled scalable font; the fixed-size bitmap font where Pillow lacks FreeType."""
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, ImportError, OSError):
    return ImageFont.load_default()


def pick(rng: np.random.Generator, items):
  return items[int(rng.integers(len(items)))]


def sentence(rng: np.random.Generator, lo: int = 4, hi: int = 11) -> str:
  words = [pick(rng, WORDS) for _ in range(int(rng.integers(lo, hi)))]
  return " ".join(words).capitalize() + "."


def number_text(rng: np.random.Generator) -> str:
  return str(int(rng.integers(0, 100)))


def wrap(text: str, fnt, width: float) -> list[str]:
  lines, current = [], ""
  for word in text.split():
    candidate = f"{current} {word}".strip()
    if current and fnt.getlength(candidate) > width:
      lines.append(current)
      current = word
    else:
      current = candidate
  return lines + ([current] if current else [])


def _record(kind: str, source: str, category: str = "", **fields) -> dict:
  return {"kind": kind, "source": source, "category": category, **fields}


# ---- text-only documents -------------------------------------------------------------------------------------

def _fact(rng) -> str:
  kind = rng.integers(5)
  if kind == 0:
    shape, sides = pick(rng, (("triangle", "three"), ("square", "four"), ("diamond", "four"), ("circle", "no")))
    return f"A {shape} has {sides} {'corners' if rng.random() < 0.5 else 'sides'}."
  if kind == 1:
    a, b = int(rng.integers(0, 50)), int(rng.integers(0, 50))
    return f"{a} + {b} = {a + b}."
  if kind == 2:
    a, b = int(rng.integers(2, 10)), int(rng.integers(2, 10))
    return f"{a} times {b} is {a * b}."
  if kind == 3:
    return f"{pick(rng, NAMES)} lives in {pick(rng, CITIES)} and likes {pick(rng, tuple(COLORS))} {pick(rng, SHAPES)}s."
  return sentence(rng)


def _code_doc(rng) -> str:
  a, b = int(rng.integers(1, 20)), int(rng.integers(1, 20))
  kind = rng.integers(3)
  if kind == 0:
    name = pick(rng, ("add", "total", "combine", "merge"))
    return f"def {name}(a, b):\n    return a + b\n\nprint({name}({a}, {b}))  # prints {a + b}"
  if kind == 1:
    return f"total = 0\nfor i in range({a}):\n    total += i\nprint(total)  # prints {a * (a - 1) // 2}"
  word = pick(rng, WORDS)
  return f"word = \"{word}\"\nprint(word.upper(), len(word))  # prints {word.upper()} {len(word)}"


def make_text(rng: np.random.Generator, split: str) -> dict:
  del split
  if rng.random() < 0.2:
    text = _code_doc(rng)
  else:
    text = " ".join(_fact(rng) for _ in range(int(rng.integers(3, 9))))
  return _record("text", "text", text=text)


# ---- OCR sources -----------------------------------------------------------------------------------------------

def make_ocr_pdfa(rng: np.random.Generator, split: str) -> dict:
  del split
  width, height = int(rng.integers(200, 321)), int(rng.integers(260, 401))
  image = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  margin, title_size, body_size = 12, int(rng.integers(14, 19)), int(rng.integers(9, 13))
  title = " ".join(pick(rng, WORDS).capitalize() for _ in range(int(rng.integers(2, 5))))
  draw.text((margin, margin), title, fill=(0, 0, 0), font=font(title_size))
  lines, y = [title], margin + title_size + 10
  body = font(body_size)
  while y + body_size < height - margin:
    paragraph = " ".join(sentence(rng) for _ in range(int(rng.integers(1, 4))))
    for line in wrap(paragraph, body, width - 2 * margin):
      if y + body_size >= height - margin:
        break
      draw.text((margin, y), line, fill=(20, 20, 20), font=body)
      lines.append(line)
      y += body_size + 3
    y += body_size // 2 + 2  # paragraph gap
  return _record("ocr", "ocr_pdfa", text="\n".join(lines), images=[png_bytes(image)])


def _form_fields(rng) -> list[tuple[str, str]]:
  fields = [
      ("Name", f"{pick(rng, NAMES)} {pick(rng, SURNAMES)}"),
      ("Date", f"{int(rng.integers(1, 29)):02d}/{int(rng.integers(1, 13)):02d}/{int(rng.integers(1970, 2000))}"),
      ("Account No.", f"{int(rng.integers(1000, 10000))}-{int(rng.integers(100, 1000))}"),
      ("Amount", f"${int(rng.integers(1, 5000))}.{int(rng.integers(0, 100)):02d}"),
      ("City", pick(rng, CITIES)),
      ("Phone", f"{int(rng.integers(200, 1000))}-{int(rng.integers(1000, 10000))}"),
  ]
  keep = sorted(rng.choice(len(fields), size=int(rng.integers(3, 7)), replace=False))
  return [fields[i] for i in keep]


def make_ocr_idl(rng: np.random.Generator, split: str) -> dict:
  del split
  size = int(rng.integers(11, 15))
  header = f"FORM {int(rng.integers(100, 1000))}-{pick(rng, ('A', 'B', 'C'))}"
  lines = [header] + [f"{key}: {value}" for key, value in _form_fields(rng)]
  width = int(max(font(size).getlength(line) for line in lines)) + int(rng.integers(40, 100))
  height = 26 + size + len(lines[1:]) * (size + 12) + int(rng.integers(10, 60))
  paper = int(rng.integers(200, 226))
  image = Image.new("L", (width, height), paper)
  draw = ImageDraw.Draw(image)
  draw.text((14, 10), header, fill=30, font=font(size + 3))
  y = 16 + size + 10
  for line in lines[1:]:
    draw.text((14, y), line, fill=int(rng.integers(20, 60)), font=font(size))
    draw.line([(14, y + size + 3), (width - 14, y + size + 3)], fill=90)
    y += size + 12
  angle = float(rng.uniform(-2.0, 2.0))
  image = image.rotate(angle, resample=Image.BILINEAR, fillcolor=paper)
  # Coarse grain quantised to a few grey levels: looks scanned, stays small as PNG.
  grain = np.round(rng.normal(0.0, 1.0, (height, width))) * 8.0
  pixels = np.asarray(image, np.float32) + grain
  pixels[rng.random((height, width)) < 0.003] = 40  # dust of a photocopy
  image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB")
  return _record("ocr", "ocr_idl", text="\n".join(lines), images=[png_bytes(image)])


def _texture(rng, width: int, height: int) -> Image.Image:
  base = rng.integers(0, 256, 3).astype(np.float32)
  other = rng.integers(0, 256, 3).astype(np.float32)
  style = rng.integers(3)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  if style == 0:  # gradient
    t = (xx / max(width - 1, 1))[..., None]
  elif style == 1:  # stripes
    period = float(rng.integers(6, 20))
    t = (((xx + yy) // period) % 2)[..., None] * 0.35
  else:  # blotches
    t = (0.5 + 0.5 * np.sin(xx / rng.uniform(5, 15)) * np.cos(yy / rng.uniform(5, 15)))[..., None] * 0.5
  pixels = base * (1 - t) + other * t
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_ocr_rendered_text(rng: np.random.Generator, split: str) -> dict:
  del split
  text = sentence(rng, 2, 7).rstrip(".")
  fnt = font(int(rng.integers(14, 31)))
  x1, y1, x2, y2 = fnt.getbbox(text)
  pad = int(rng.integers(6, 20))
  width, height = x2 + 2 * pad, max(32, y2 + 2 * pad)
  image = _texture(rng, width, height)
  luminance = np.asarray(image, np.float32).mean()
  ink = (0, 0, 0) if luminance > 128 else (255, 255, 255)
  ImageDraw.Draw(image).text((pad, (height - y2 - y1) // 2), text, fill=ink, font=fnt)
  return _record("ocr", "ocr_rendered_text", text=text, images=[png_bytes(image)])


def make_ocr_docstruct(rng: np.random.Generator, split: str) -> dict:
  del split
  size = int(rng.integers(10, 14))
  fnt = font(size)
  if rng.random() < 0.5:  # table with a header row
    n_cols, n_rows = int(rng.integers(2, 5)), int(rng.integers(2, 6))
    header = [pick(rng, ("Item", "Name", "Year", "Total", "Price", "City", "Count", "Rate"))
              for _ in range(n_cols)]
    rows = [header] + [[pick(rng, WORDS) if rng.random() < 0.4 else str(int(rng.integers(0, 1000)))
                        for _ in range(n_cols)] for _ in range(n_rows)]
    col_w = [int(max(fnt.getlength(r[c]) for r in rows)) + 12 for c in range(n_cols)]
    row_h = size + 10
    width, height = sum(col_w) + 20, row_h * len(rows) + 20
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 10, 10 + sum(col_w), 10 + row_h], fill=(215, 225, 240))
    for r, row in enumerate(rows):
      x = 10
      for c, cell in enumerate(row):
        draw.rectangle([x, 10 + r * row_h, x + col_w[c], 10 + (r + 1) * row_h], outline=(60, 60, 60))
        draw.text((x + 6, 10 + r * row_h + 5), cell, fill=(0, 0, 0), font=fnt)
        x += col_w[c]
    lines = [" | ".join(row) for row in rows]
  else:  # key-value layout
    pairs = _form_fields(rng)
    key_w = int(max(fnt.getlength(k + ":") for k, _ in pairs)) + 16
    val_w = int(max(fnt.getlength(v) for _, v in pairs)) + 16
    row_h = size + 12
    width, height = key_w + val_w + 20, row_h * len(pairs) + 20
    image = Image.new("RGB", (width, height), (250, 250, 245))
    draw = ImageDraw.Draw(image)
    for r, (key, value) in enumerate(pairs):
      y = 10 + r * row_h
      draw.rectangle([10, y, 10 + key_w, y + row_h], fill=(230, 230, 230), outline=(80, 80, 80))
      draw.rectangle([10 + key_w, y, 10 + key_w + val_w, y + row_h], outline=(80, 80, 80))
      draw.text((16, y + 6), key + ":", fill=(0, 0, 0), font=fnt)
      draw.text((16 + key_w, y + 6), value, fill=(0, 0, 0), font=fnt)
    lines = [f"{k}: {v}" for k, v in pairs]
  return _record("ocr", "ocr_docstruct", text="\n".join(lines), images=[png_bytes(image)])


# ---- text-rich SFT ---------------------------------------------------------------------------------------------

def render_word(rng: np.random.Generator, text: str) -> bytes:
  """One big word on a light background, placed off-centre so position varies."""
  height = int(rng.integers(96, 200))
  fnt = font(int(height * rng.uniform(0.45, 0.6)))
  x1, y1, x2, y2 = fnt.getbbox(text)
  width = max(96, int((x2 + 16) * rng.uniform(1.1, 1.8)))
  background = tuple(int(v) for v in rng.integers(200, 256, 3))
  ink = tuple(int(v) for v in rng.integers(0, 90, 3))
  image = Image.new("RGB", (width, height), background)
  x = int(rng.integers(8, max(9, width - x2 - 8)))
  y = int(rng.integers(0, max(1, height - y2 - 4)))
  ImageDraw.Draw(image).text((x, y), text, fill=ink, font=fnt)
  return png_bytes(image)


def make_sft_text_rich(rng: np.random.Generator, split: str) -> dict:
  if rng.random() < 0.6:
    text, question = pick(rng, SIGN_WORDS), pick(rng, ("What word is written in the image?",
                                                       "What is written in the image?"))
  else:
    text, question = number_text(rng), pick(rng, ("What number is written in the image?",
                                                  "What is written in the image?"))
  image = render_word(rng, text)
  if split == "test":
    return held_out_record("sft_text_rich", "text_rich", question, text, image, "anls")
  messages = [{"role": "user", "content": "<image>\n" + question}, {"role": "assistant", "content": text}]
  return _record("sft", "sft_text_rich", "text_rich", messages=messages, images=[image])
