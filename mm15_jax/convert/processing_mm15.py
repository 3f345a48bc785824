"""Model inputs of the MM1.5-style model (modeling_mm15.py) from PIL images and a prompt, written by `mm15 export-hf`.

    processor = AutoProcessor.from_pretrained(out_dir, trust_remote_code=True)
    inputs = processor(images=[Image.open("photo.jpg")], text="Where is the red circle?")
    new = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    print(processor.decode(new[0, inputs["input_ids"].shape[1]:]))

It prepares a prompt as the stage the model was exported from does (mm15_jax/data/images.py and samples.py, with the
settings in processor_config.json): each image is split into tiles of `tile_size` pixels ("split": mode "none",
"static" or "dynamic", the dynamic grid chosen by the same rule), never stretched: the image is cut into the square
blocks its grid covers, each resized onto the top-left of its tile at one scale (PIL's antialiased bicubic, the
project's data.split.resample="antialias"; "fast", OpenCV, is within a few levels of it) and padded with the CLIP
mean; the overview (the whole image in one tile) comes after the tiles (before them with "overview_first"). In the
text each image k becomes
    <img_start> <img_k> [<row_i> <col_j> <image>*T]... [<overview> <image>*T] <img_end>
with T = tokens_per_tile ("tile_markers": "separator" puts "," between the tiles of a row and "\\n" between rows
instead of <row_i> <col_j>); a prompt with more than "max_images_to_split" images has each image as one tile.
`text` is one user turn ("<image>" marks place the images; without any, one "<image>\\n" per image comes first),
`messages` a conversation; either is formatted by the chat template the model was trained with (the LLM's own from
tokenizer/, else the built-in <|user|> ... <|end|> <|assistant|>) and ends with the assistant's header. The
project's special tokens follow the LLM's vocabulary and are never parsed from text.
"""
from __future__ import annotations

import datetime
import json
import os
import re

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature

from .modeling_mm15 import preprocess_tiles

IMAGE_MARK = "<image>"
ROLES = ("system", "user", "assistant")
PAD_RGB = (123, 117, 104)  # CLIP mean in 0..255: padding normalises to ~0
REDUCING_GAP = 1.5         # PIL's reducing_gap of the project's "antialias" resize


# --- images: the project's splitting (mm15_jax/data/images.py) ------------------------------------------------------

def to_rgb(image: Image.Image) -> np.ndarray:
  """uint8 [H, W, 3]; transparent areas composited over white, as the project decodes images."""
  if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
    image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
  return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def fit_size(h: int, w: int, canvas_h: int, canvas_w: int) -> tuple[int, int]:
  scale = min(canvas_h / h, canvas_w / w)
  return min(canvas_h, max(1, int(round(h * scale)))), min(canvas_w, max(1, int(round(w * scale))))


def choose_grid(h: int, w: int, tile: int, n_min: int, n_max: int) -> tuple[int, int]:
  """Among n_min <= rows * cols <= n_max: the least padding among grids that need no downscaling, else the least
  resolution lost; ties: least padding, fewest tiles, fewest rows."""
  no_downscale, downscale = [], []
  for n_h in range(1, n_max + 1):
    for n_w in range(1, n_max + 1):
      if not n_min <= n_h * n_w <= n_max:
        continue
      canvas_h, canvas_w = n_h * tile, n_w * tile
      h_g, w_g = fit_size(h, w, canvas_h, canvas_w)
      padding = canvas_h * canvas_w - h_g * w_g
      if h <= canvas_h and w <= canvas_w:
        no_downscale.append(((padding, n_h * n_w, n_h), (n_h, n_w)))
      else:
        downscale.append(((h * w - h_g * w_g, padding, n_h * n_w, n_h), (n_h, n_w)))
  return min(no_downscale or downscale)[1]


def split_image(pixels: np.ndarray, split: dict, tile: int, *, allow_split: bool, n_max: int | None = None):
  """(grid or None, [(block, side of the square it is part of)] in tile order)."""
  h, w = pixels.shape[:2]
  if split["mode"] == "none" or not allow_split:
    return None, [(pixels, max(h, w))]
  if split["mode"] == "static":
    grid = (split["static_grid"], split["static_grid"])
  else:
    grid = choose_grid(h, w, tile, split["n_min"], split["n_max"] if n_max is None else n_max)
  k = max(-(-h // grid[0]), -(-w // grid[1]))  # the smallest square whose grid covers the image
  blocks = [(pixels[i * k:(i + 1) * k, j * k:(j + 1) * k], k) for i in range(grid[0]) for j in range(grid[1])]
  if split["overview"]:
    whole = (pixels, max(h, w))
    blocks = [whole] + blocks if split["overview_first"] else blocks + [whole]
  return grid, blocks


def tile_of(block: np.ndarray, side: int, tile: int) -> np.ndarray:
  """uint8 [tile, tile, 3]: the block resized at tile / side onto the top-left, PAD_RGB around it."""
  out = np.empty((tile, tile, 3), np.uint8)
  out[...] = PAD_RGB
  h, w = (min(tile, max(1, round(n * tile / side))) if n else 0 for n in block.shape[:2])
  if h and w:
    if (h, w) != block.shape[:2]:
      block = np.asarray(Image.fromarray(np.ascontiguousarray(block)).resize(
          (w, h), Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP))
    out[:h, :w] = block
  return out


# --- text: the LLM's tokenizer and chat template with the project's special tokens ----------------------------------

def _compile_template(source: str):
  """The chat template in the jinja2 environment transformers renders templates in."""
  try:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
  except ImportError as e:
    raise ImportError("this model's chat template needs jinja2: pip install jinja2") from e

  class Generation(jinja2.ext.Extension):
    """{% generation %} ... {% endgeneration %} renders its body."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(source)


class TextTokenizer:
  """The LLM's tokenizer in `folder` (tokenizer.model, or tokenizer.json + tokenizer_config.json) and the
  project's special ids after its vocabulary (`config`: processor_config.json)."""

  def __init__(self, folder: str, config: dict):
    self.special, self.base_vocab_size = config["special_tokens"], config["base_vocab_size"]
    self.bos_id = config["bos_id"]  # None: prompts start without BOS
    self.template, self.tokens, self._hf, self._sp = None, {}, None, None
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
      import tokenizers
      self._hf = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
      config_path, template_path = (os.path.join(folder, n) for n in ("tokenizer_config.json", "chat_template.jinja"))
      tok_config = {}
      if os.path.exists(config_path):
        with open(config_path) as f:
          tok_config = json.load(f)
      for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = tok_config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None:
          self.tokens[name] = token
      source = tok_config.get("chat_template")
      if os.path.exists(template_path):
        with open(template_path) as f:
          source = f.read() or source
      if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
        source = {t["name"]: t["template"] for t in source}.get("default")
      self.template = _compile_template(source) if source else None
    else:
      try:
        import sentencepiece
      except ImportError as e:
        raise ImportError("this model's tokenizer is a sentencepiece model: pip install sentencepiece") from e
      self._sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))

  def encode(self, text: str) -> list[int]:
    """Plain text -> the LLM's ids (no BOS/EOS, no special token of the project parsed)."""
    if not text:
      return []
    return self._hf.encode(text, add_special_tokens=False).ids if self._hf is not None else self._sp.encode(text)

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids if 0 <= int(i) < self.base_vocab_size]
    return self._hf.decode(ids, skip_special_tokens=True) if self._hf is not None else self._sp.decode(ids)

  def prompt(self, messages: list[dict], image_ids) -> list[int]:
    """BOS, the conversation through the chat template and the assistant's header; `image_ids()` gives the ids of
    the next image at each "<image>" mark."""
    if self.template is None:  # built-in: <|role|> content <|end|> per message
      ids = []
      for message in messages:
        ids.append(self.special[f"<|{message['role']}|>"])
        for n, piece in enumerate(message["content"].split(IMAGE_MARK)):
          ids += (image_ids() if n else []) + self.encode(piece)
        ids.append(self.special["<|end|>"])
      ids.append(self.special["<|assistant|>"])
    else:
      text = self.template.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                  add_generation_prompt=True, **self.tokens)
      ids = []
      for n, piece in enumerate(text.split(IMAGE_MARK)):
        ids += (image_ids() if n else []) + self.encode(piece)
      if ids and self.bos_id is not None and ids[0] == self.bos_id:
        ids = ids[1:]  # the template's BOS: added below, as for a template without one
    return ([] if self.bos_id is None else [self.bos_id]) + ids


# --- the processor ---------------------------------------------------------------------------------------------

class Mm15Processor:
  """`processor(text=..., images=[...])` or `processor(messages=[...], images=[...])` -> input_ids [1, L],
  attention_mask [1, L] and pixel_values [tiles, 3, S, S] (CLIP-normalised, placeholder order); `n_max` raises the
  dynamic split's largest grid, as `mm15 generate --n-max` does."""

  def __init__(self, folder: str, config: dict):
    self.config = config
    self.split, self.tile_size, self.tokens_per_tile = config["split"], config["tile_size"], config["tokens_per_tile"]
    self.tokenizer = TextTokenizer(os.path.join(folder, "tokenizer"), config)
    self.image_token_id = config["special_tokens"]["<image>"]

  @classmethod
  def from_pretrained(cls, path: str, **kwargs) -> Mm15Processor:
    if not os.path.isdir(path):  # a Hub repository
      from huggingface_hub import snapshot_download
      path = snapshot_download(path, allow_patterns=["processor_config.json", "tokenizer/*"],
                               revision=kwargs.get("revision"), token=kwargs.get("token"))
    with open(os.path.join(path, "processor_config.json")) as f:
      return cls(path, json.load(f))

  @classmethod
  def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
    """Called by AutoProcessor on remote-code classes (for push_to_hub); nothing to register here."""

  def image_ids(self, k: int, grid) -> list[int]:
    """The text of image k (1-based) split on `grid` (None: one tile)."""
    s, tile = self.tokenizer.special, [self.image_token_id] * self.tokens_per_tile
    ids = [s["<img_start>"], s[f"<img_{k}>"]]
    if grid is None:
      return ids + tile + [s["<img_end>"]]
    cells = []
    for i in range(grid[0]):
      for j in range(grid[1]):
        if self.split["tile_markers"] == "index":
          cells += [s[f"<row_{i + 1}>"], s[f"<col_{j + 1}>"]] + tile
        else:
          last_col, last_row = j == grid[1] - 1, i == grid[0] - 1
          cells += tile + (self.tokenizer.encode(",") if not last_col else
                           self.tokenizer.encode("\n") if not last_row else [])
    overview = [s["<overview>"]] + tile if self.split["overview"] else []
    return ids + (overview + cells if self.split["overview_first"] else cells + overview) + [s["<img_end>"]]

  def __call__(self, text: str | None = None, images=None, *, messages: list[dict] | None = None,
               n_max: int | None = None, return_tensors: str = "pt") -> BatchFeature:
    if isinstance(images, Image.Image):
      images = [images]
    images = list(images or [])
    if (text is None) == (messages is None):
      raise ValueError("give the prompt as `text` (one user turn) or as `messages` (a conversation): one of them")
    special = self.tokenizer.special
    most_images, most_side = (sum(bool(re.fullmatch(p, name)) for name in special) for p in (r"<img_\d+>", r"<row_\d+>"))
    if len(images) > most_images:
      raise ValueError(f"{len(images)} images: a prompt holds at most {most_images}")
    if n_max is not None and not (self.split["mode"] == "dynamic" and self.split["n_min"] <= n_max <= most_side):
      raise ValueError(f"n_max={n_max} applies to a dynamic split, from its n_min={self.split['n_min']} to "
                       f"{most_side}; this model's split is {self.split['mode']!r}")
    if messages is None:
      messages = [{"role": "user", "content": text if IMAGE_MARK in text else f"{IMAGE_MARK}\n" * len(images) + text}]
    for n, m in enumerate(messages):
      if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
        raise ValueError(f"message {n}: give {{'role': one of {ROLES}, 'content': a string}}, got {m!r:.80}")
    marks = sum(m["content"].count(IMAGE_MARK) for m in messages)
    if marks != len(images):
      raise ValueError(f"the prompt has {marks} '{IMAGE_MARK}' marks for {len(images)} images")
    allow_split = len(images) <= self.split["max_images_to_split"]
    tiles, used = [], []

    def next_image() -> list[int]:
      if len(used) == len(images):
        raise ValueError(f"the chat template renders more '{IMAGE_MARK}' marks than the {len(images)} images")
      pixels = to_rgb(images[len(used)])
      grid, blocks = split_image(pixels, self.split, self.tile_size, allow_split=allow_split, n_max=n_max)
      tiles.extend(tile_of(block, side, self.tile_size) for block, side in blocks)
      used.append(grid)
      return self.image_ids(len(used), grid)

    ids = self.tokenizer.prompt(messages, next_image)
    if len(used) != len(images):
      raise ValueError(f"the chat template rendered {len(used)} of the {len(images)} '{IMAGE_MARK}' marks")
    data = {"input_ids": torch.tensor([ids], dtype=torch.long),
            "attention_mask": torch.ones((1, len(ids)), dtype=torch.long)}
    if tiles:
      data["pixel_values"] = preprocess_tiles(torch.from_numpy(np.stack(tiles)))
    if return_tensors == "np":
      data = {k: v.numpy() for k, v in data.items()}
    elif return_tensors != "pt":
      raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
    return BatchFeature(data)

  def decode(self, ids, **unused) -> str:
    """Generated ids -> text; the project's special ids and the LLM's control tokens are always dropped (so
    transformers' skip_special_tokens and similar options change nothing)."""
    return self.tokenizer.decode(ids.tolist() if hasattr(ids, "tolist") else ids)

  def batch_decode(self, rows, **unused) -> list[str]:
    return [self.decode(row) for row in rows]
