"""Decoded record -> one tokenised sample (ids, per-id loss mask, tiles).

Layout: BOS (when the LLM uses one), content, EOS. Each image becomes a block
  <img_start> <img_k> [<row_i> <col_j> <image>*T]... [<overview> <image>*T] <img_end>   (split image)
  <img_start> <img_k> <image>*T <img_end>                                                (unsplit image)
(ablations, data.split: overview_first puts the overview part before the tiles; tile_markers="separator" drops
<row_i> <col_j> and puts "," between the tiles of a row and "\n" between rows.)
with T = tokens_per_tile, tiles in placeholder order. `loss_mask[t]` says whether ids[t] is trained as a target
(predicted from ids[:t]); the pipeline shifts it together with the ids. EOS is always trained, BOS, image blocks
and prompts never. Trained per kind: caption -> the caption (image first); interleaved -> all text; text -> all;
ocr -> the transcription (image first); sft -> assistant turns (chat template, see tokenizer.py).

A video sft record (records.py, data/video.py) has one "<video>" mark; it becomes its sampled frames in temporal
order, frame k (1-based) as the image block of image k, never split, preceded by its timestamp as text
(data.video.timestamps):  "0.5s" <img_start> <img_1> <image>*T <img_end> "1.5s" <img_start> <img_2> ...
The image-index tokens are the frame indices (MM1.5-Video feeds frames as multi-image input); the timestamps let
questions about time (before/after, when) be answered from the prompt.

Bad records raise ValueError naming the record (`where`): missing/ill-typed fields, undecodable images, boxes or
points outside the 0..1000 grid, and samples too long for a sequence (more than seq_len + 1 ids, i.e. more than
seq_len input tokens) or with more tiles than max_images. Nothing is truncated silently.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple, Sequence

import numpy as np

from mm15_jax.config import DataConfig, SplitConfig
from mm15_jax.data import images as images_lib
from mm15_jax.data import records
from mm15_jax.data import video as video_lib
from mm15_jax.data.tokenizer import IMAGE_MARK, MAX_IMAGES_PER_SAMPLE, Tokenizer

VIDEO_MARK = records.VIDEO_MARKER
KINDS = ("caption", "interleaved", "text", "ocr", "sft")
# "[12, 34]" or "[1, 2, 3, 4]": coordinate lists on the 0..1000 grid of the whole image.
_COORDS = re.compile(r"\[\s*(-?\d+(?:\.\d+)?(?:\s*,\s*-?\d+(?:\.\d+)?)+)\s*\]")


class Sample(NamedTuple):
  ids: np.ndarray                            # int32 [L]: BOS ... EOS
  loss_mask: np.ndarray                      # float32 [L]: 1 where ids[t] is a trained target
  images: tuple[images_lib.SplitImage, ...]  # in placeholder order; their tiles are resized when written
  tile_size: int                             # S

  @property
  def n_tiles(self) -> int:
    return sum(split.n_tiles for split in self.images)

  def write_tiles(self, out: np.ndarray, extent: np.ndarray | None = None) -> None:
    """out uint8 [n_tiles, S, S, 3] (each tile C-contiguous, e.g. a batch row's tile slots) = the sample's tiles;
    with `extent` (int32 [n_tiles, 4]) their source pixels and extents instead (SplitImage.write_sources)."""
    start = 0
    for split in self.images:
      span = slice(start, start + split.n_tiles)
      if extent is None:
        split.write_tiles(out[span])
      else:
        split.write_sources(out[span], extent[span])
      start += split.n_tiles

  @property
  def tiles(self) -> np.ndarray:
    """uint8 [n_tiles, S, S, 3] in placeholder order (a new array)."""
    out = np.empty((self.n_tiles, self.tile_size, self.tile_size, 3), np.uint8)
    self.write_tiles(out)
    return out


@dataclasses.dataclass(frozen=True)
class SampleSpec:
  split: SplitConfig
  tile_size: int
  tokens_per_tile: int
  seq_len: int            # input tokens per sequence (a sample may have seq_len + 1 ids)
  max_images: int         # tiles per sample (and per packed sequence)
  max_pixels: int
  video_frames: int = 24  # data.video.frames
  video_timestamps: bool = True

  def __post_init__(self):
    if not 1 <= self.video_frames <= MAX_IMAGES_PER_SAMPLE:
      raise ValueError(f"data.video.frames must be in 1..{MAX_IMAGES_PER_SAMPLE} (image-index tokens), got "
                       f"{self.video_frames}")

  @classmethod
  def from_config(cls, data_cfg: DataConfig, *, tile_size: int, tokens_per_tile: int) -> SampleSpec:
    return cls(split=data_cfg.split, tile_size=tile_size, tokens_per_tile=tokens_per_tile,
               seq_len=data_cfg.seq_len, max_images=data_cfg.max_images, max_pixels=data_cfg.max_image_pixels,
               video_frames=data_cfg.video.frames, video_timestamps=data_cfg.video.timestamps)


def check_coordinates(text: str, where: str) -> None:
  """Boxes/points in text must be on the 0..1000 grid."""
  for match in _COORDS.finditer(text):
    values = [float(v) for v in match.group(1).split(",")]
    if any(v < 0 or v > 1000 for v in values):
      raise ValueError(f"{where}: coordinates {match.group(0)} outside the 0..1000 grid")


def image_block(tokenizer: Tokenizer, k: int, split: images_lib.SplitImage, tokens_per_tile: int,
                markers: str = "index") -> list[int]:
  """Token ids of image k (1-based) of a sample; `markers`: SplitConfig.tile_markers."""
  tile = [tokenizer.image_id] * tokens_per_tile
  ids = [tokenizer.img_start_id, tokenizer.img_id(k)]
  if split.grid is None:
    return ids + tile + [tokenizer.img_end_id]
  n_h, n_w = split.grid
  grid = []
  for i in range(n_h):
    for j in range(n_w):
      if markers == "index":
        grid += [tokenizer.row_id(i + 1), tokenizer.col_id(j + 1)] + tile
      else:
        grid += tile + (tokenizer.encode(",") if j < n_w - 1 else tokenizer.encode("\n") if i < n_h - 1 else [])
  overview = [tokenizer.overview_id] + tile if split.overview else []
  ids += overview + grid if split.overview_first else grid + overview
  return ids + [tokenizer.img_end_id]


class _Builder:
  """Accumulates ids, mask and images of one sample."""

  def __init__(self, record: dict, tokenizer: Tokenizer, spec: SampleSpec, where: str, n_images: int,
               n_max: int | None = None):
    self.tok, self.spec, self.where, self.n_max = tokenizer, spec, where, n_max
    self.record = record
    raw_images = records.require_field(record, "images", list, where)
    self.raw_images = raw_images
    self.allow_split = n_images <= spec.split.max_images_to_split
    self.ids: list[int] = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    self.mask: list[int] = [0] * len(self.ids)
    self.images: list[images_lib.SplitImage] = []
    self.n_used = 0
    self.frames: list[np.ndarray] | None = None  # a video's sampled frames (expand_video)

  def add(self, ids: list[int], trained: bool) -> None:
    self.ids += ids
    self.mask += [int(trained)] * len(ids)

  def text(self, text: str) -> list[int]:
    check_coordinates(text, self.where)
    return self.tok.encode(text) if text else []

  def image(self, index: int) -> list[int]:
    """Ids of the image's block (a video's frame once `expand_video` ran); its tiles are appended to the sample's
    image list."""
    if self.frames is not None:
      if not 0 <= index < len(self.frames):
        raise ValueError(f"{self.where}: frame index {index} but the video has {len(self.frames)} sampled frames")
      split = images_lib.split_image(self.frames[index], self.spec.split, tile_size=self.spec.tile_size,
                                     allow_split=False)
      self.n_used += 1
      self.images.append(split)
      return image_block(self.tok, self.n_used, split, self.spec.tokens_per_tile, self.spec.split.tile_markers)
    if not 0 <= index < len(self.raw_images):
      raise ValueError(f"{self.where}: image index {index} but the record has {len(self.raw_images)} images")
    raw = self.raw_images[index]
    if not isinstance(raw, (bytes, bytearray)):
      raise ValueError(f"{self.where}: image {index} is {type(raw).__name__}, not bytes")
    if self.n_used >= MAX_IMAGES_PER_SAMPLE:
      raise ValueError(f"{self.where}: more than {MAX_IMAGES_PER_SAMPLE} images in one sample")
    pixels = images_lib.decode_image(bytes(raw), max_pixels=self.spec.max_pixels,
                                     where=f"{self.where} image {index}")
    split = images_lib.split_image(pixels, self.spec.split, tile_size=self.spec.tile_size, n_max=self.n_max,
                                   allow_split=self.allow_split)
    self.n_used += 1
    self.images.append(split)
    return image_block(self.tok, self.n_used, split, self.spec.tokens_per_tile, self.spec.split.tile_markers)

  def chat(self, messages: Sequence[Any], *, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Messages through the tokenizer's chat template, images in place of their "<image>" marks (in order)."""
    for message in messages:
      if isinstance(message, dict) and isinstance(message.get("content"), str):
        check_coordinates(message["content"], self.where)
    return self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        image_ids=lambda: self.image(self.n_used), where=self.where)

  def expand_video(self, messages: list) -> list:
    """A video record's messages with its "<video>" mark replaced by one "<image>" mark per sampled frame, each
    after its timestamp text ("0.5s<image>1.5s<image>..."); `image` then takes the frames in order. Other records'
    messages are returned as they are."""
    if "video" not in self.record:
      return messages
    frames = video_lib.record_frames(self.record, self.spec.video_frames, max_pixels=self.spec.max_pixels,
                                     where=self.where)
    self.frames = frames.pixels
    marks = "".join((f"{t:.1f}s" if self.spec.video_timestamps else "") + IMAGE_MARK for t in frames.timestamps)
    return [dict(m, content=m["content"].replace(VIDEO_MARK, marks)) for m in messages]

  def finish(self, *, eos: bool, max_ids: int) -> Sample:
    if eos:
      self.ids.append(self.tok.eos_id)
      self.mask.append(1)
    sample = Sample(np.asarray(self.ids, np.int32), np.asarray(self.mask, np.float32), tuple(self.images),
                    self.spec.tile_size)
    if len(self.ids) > max_ids:
      raise ValueError(f"{self.where}: over-long sample, {len(self.ids) - 1} tokens > seq_len {max_ids - 1}")
    if sample.n_tiles > self.spec.max_images:
      raise ValueError(f"{self.where}: over-long sample, {sample.n_tiles} tiles > max_images {self.spec.max_images}")
    return sample


def make_sample(record: dict, tokenizer: Tokenizer, spec: SampleSpec, *, where: str = "record") -> Sample:
  """One training sample from a decoded record (see the module docstring)."""
  if not isinstance(record, dict):
    raise ValueError(f"{where}: record is {type(record).__name__}, not dict")
  kind = records.require_field(record, "kind", str, where)
  if kind not in KINDS:
    raise ValueError(f"{where}: unknown kind {kind!r}")
  images = record.get("images", []) if kind == "text" else records.require_field(record, "images", list, where)
  b = _Builder(dict(record, images=images), tokenizer, spec, where, n_images=len(images))
  if kind in ("caption", "ocr"):
    text = records.require_field(record, "text", str, where)
    if len(images) != 1:
      raise ValueError(f"{where}: a {kind} record needs exactly one image, got {len(images)}")
    if not text:
      raise ValueError(f"{where}: empty text")
    b.add(b.image(0), trained=False)
    b.add(b.text(text), trained=True)
  elif kind == "text":
    text = records.require_field(record, "text", str, where)
    if not text:
      raise ValueError(f"{where}: empty text")
    b.add(b.text(text), trained=True)
  elif kind == "interleaved":
    segments = records.require_field(record, "segments", list, where)
    if not segments:
      raise ValueError(f"{where}: no segments")
    for seg in segments:
      if isinstance(seg, str):
        b.add(b.text(seg), trained=True)
      elif isinstance(seg, (int, np.integer)) and not isinstance(seg, bool):
        b.add(b.image(int(seg)), trained=False)
      else:
        raise ValueError(f"{where}: segment {seg!r:.40} is neither str nor int")
  else:  # sft
    messages = records.require_field(record, "messages", list, where)
    _check_image_marks(messages, len(images), where, record)
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
      raise ValueError(f"{where}: sft record without an assistant turn")
    turn_ids, trained = b.chat(b.expand_video(messages))
    b.ids += turn_ids
    b.mask += trained
  return b.finish(eos=True, max_ids=spec.seq_len + 1)


def _check_image_marks(messages: Sequence[Any], n_images: int, where: str, record: dict | None = None) -> None:
  marks = sum(m.get("content", "").count(IMAGE_MARK) for m in messages
              if isinstance(m, dict) and isinstance(m.get("content"), str))
  if record is not None and "video" in record:
    records.check_video(record["video"], messages, marks, n_images, where)
  elif marks != n_images:
    raise ValueError(f"{where}: {marks} '{IMAGE_MARK}' marks in the messages but {n_images} images")


def encode_prompt(record: dict, tokenizer: Tokenizer, spec: SampleSpec, *, n_max: int | None = None,
                  where: str = "record") -> Sample:
  """Evaluation prompt of an sft record: BOS, the conversation up to and including the last user turn, then the
  assistant header, as a Sample (ids int32 [L], its images; write_tiles as in training). `n_max` overrides the
  dynamic split's largest grid (inference may use more tiles than training; n_min is never changed)."""
  if records.require_field(record, "kind", str, where) != "sft":
    raise ValueError(f"{where}: encode_prompt needs an sft record, got kind {record['kind']!r}")
  messages = records.require_field(record, "messages", list, where)
  last_user = max((n for n, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"),
                  default=None)
  if last_user is None:
    raise ValueError(f"{where}: no user turn to prompt with")
  prompt = messages[:last_user + 1]
  images = records.require_field(record, "images", list, where)
  _check_image_marks(messages, len(images), where, record)
  b = _Builder(record, tokenizer, spec, where, n_images=len(images), n_max=n_max)
  turn_ids, _ = b.chat(b.expand_video(prompt), add_generation_prompt=True)
  b.add(turn_ids, trained=False)
  return b.finish(eos=False, max_ids=spec.seq_len)
