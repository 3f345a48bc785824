"""Readers for the formats real datasets ship in; each turns one input shard into data records.

  webdataset: tar shards, members grouped by key (`dir/KEY.EXT`, EXT = everything after the first dot of the
              file name); a sample has an image member (.jpg/.jpeg/.png/.webp/.tif/.tiff) and a .txt and/or .json
              member holding the text.
  parquet:    Hugging Face datasets layout; an image cell holds a {"bytes", "path"} struct, raw bytes or a path
              (relative to the image root). By kind:
                ocr, caption   an image column and a text column ("image", "text");
                text           a text column ("text");
                interleaved    OBELICS: aligned lists "images" and "texts", each position either an image or a
                               text (the other null), in document order;
                sft            the_cauldron ("images": list, "texts": [{"user", "assistant"}]) or LLaVA-OneVision
                               ("conversations": [{"from", "value"}], "image": one image or null), told apart by
                               their columns.
  jsonl:      one JSON object a line with the fields of a parquet row (kinds text and interleaved); image paths
              relative to the image root (default: the file's folder).
  llava:      a JSON list (or JSONL) of {"id", "image": path | [paths], "conversations": [{"from", "value"}]}
              with images under an image root; becomes kind "sft".
  llava-video: the LLaVA-Video / video-instruct layout, {"id", "video": path, "conversations": [...]} with videos
              under the image root; becomes kind "sft" video records (data/video.py) holding the video file, or
              `video_frames` uniformly sampled JPEG frames and their timestamps. The video's "<image>" (or "<video>")
              marker becomes "<video>"; without one, "<video>\n" goes before the first question.
  rico:       RICO-style view hierarchy JSON files beside their screenshots -> UI records (convert_ui.py).

A reader yields (key, record) for good entries and (key, BadEntry) for entries to skip; an error that spoils the
whole shard (unreadable tar or parquet file, a column that does not exist) raises. Images keep their original
encoded bytes after a cheap validity check (PIL open + verify).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
import warnings
from collections.abc import Iterator
from typing import Any

from PIL import Image

from mm15_jax.data import records
from mm15_jax.data import video as video_lib

FORMATS = ("webdataset", "parquet", "llava", "jsonl", "llava-video", "rico")
# The record kinds each format can make.
KINDS = {"webdataset": ("ocr", "caption"), "parquet": ("ocr", "caption", "text", "interleaved", "sft"),
         "llava": ("sft",), "jsonl": ("text", "interleaved"), "llava-video": ("sft",),
         "rico": ("sft", "ui_ocr", "ui_widget", "ui_icon", "ui_ground")}  # convert_ui.KINDS
VIDEO_MAX_PIXELS = 64_000_000  # per frame, as data.max_image_pixels
# Column (field) names by kind when none is given: (image column, text column).
DEFAULT_COLUMNS = {"interleaved": ("images", "texts")}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "tif", "tiff")  # preference order inside one sample
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_PARQUET_BATCH_ROWS = 256


class BadEntry(Exception):
  """An input entry that is skipped: `reason` is a short category for the summary, `detail` says what is wrong."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
  """What a conversion makes of its inputs; the fields that shape records are part of each shard's fingerprint."""
  format: str
  kind: str  # one of KINDS[format]
  source: str
  category: str = ""
  text_field: str = ""  # webdataset: "" = the .txt member, else a dotted key into the .json member
  image_column: str = "image"
  text_column: str = "text"
  image_root: str = ""           # llava, and image paths in parquet / jsonl cells
  records_per_shard: int = 10000  # llava: entries per shard
  video_frames: int = 0          # llava-video: 0 stores the video file, N stores N sampled frames

  def fingerprint(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class Shard:
  """One unit of work: a whole input file, or entries [start, stop) of a LLaVA JSON file (held in `entries`)."""
  path: str
  start: int = 0
  stop: int = -1
  entries: list | None = None

  @property
  def label(self) -> str:
    return self.path if self.entries is None else f"{self.path}[{self.start}:{self.stop}]"


def check_image(data: Any, what: str = "image") -> bytes:
  """Returns the encoded bytes if PIL can open and verify them; raises BadEntry otherwise."""
  if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
    raise BadEntry("missing image", f"{what} has no bytes")
  data = bytes(data)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as im:
        im.verify()
  except Exception as e:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError, ...)
    raise BadEntry("unreadable image", f"{what}: {type(e).__name__}: {e}") from None
  return data


def _text_value(value: Any, field: str) -> str:
  """A string, or a (nested) list of strings joined by newlines, as OCR json stores lines."""
  if isinstance(value, str):
    return value
  if isinstance(value, list) and value:
    return "\n".join(_text_value(v, field) for v in value)
  raise BadEntry("missing field", f"{field!r} is {type(value).__name__}, not text")


def json_field(payload: Any, dotted: str) -> Any:
  """payload["a"]["b"] for "a.b"; through a list, the key is looked up in every element (a list results)."""
  value = payload
  for part in dotted.split("."):
    if isinstance(value, list):
      value = [json_field(v, part) for v in value]
    elif isinstance(value, dict) and part in value:
      value = value[part]
    else:
      raise BadEntry("missing field", f"json has no field {dotted!r}")
  return value


def _checked_text(text: str, field: str) -> str:
  if not text.strip():
    raise BadEntry("missing field", f"{field} is empty")
  return text


# ---------------------------------------------------------------------------------------------------- webdataset

def _webdataset_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
  """(key, {extension: bytes}) per sample; a sample's members are consecutive in the tar (webdataset layout)."""
  key, members = None, {}
  with tarfile.open(path, "r|*") as tar:  # streaming: members are read in order, also for .tar.gz
    for member in tar:
      if not member.isfile():
        continue
      directory, base = os.path.split(member.name)
      if base.startswith(".") or "." not in base:
        continue
      stem, ext = base.split(".", 1)
      member_key = os.path.join(directory, stem)
      if member_key != key:
        if key is not None:
          yield key, members
        key, members = member_key, {}
      members[ext.lower()] = tar.extractfile(member).read()
  if key is not None:
    yield key, members


def _webdataset_record(members: dict[str, bytes], opts: ConvertOptions) -> dict:
  image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
  if image_ext is None:
    hint = " (PDF pages must be rendered to images first)" if "pdf" in members else ""
    raise BadEntry("missing image", f"no image member among {sorted(members)}{hint}")
  image = check_image(members[image_ext], f".{image_ext}")
  if not opts.text_field:
    if "txt" not in members:
      raise BadEntry("missing field", f"no .txt member among {sorted(members)}")
    try:
      text = members["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadEntry("missing field", f".txt is not UTF-8 ({e})") from None
    text = _checked_text(text, ".txt")
  else:
    if "json" not in members:
      raise BadEntry("missing field", f"no .json member among {sorted(members)}")
    try:
      payload = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise BadEntry("missing field", f"unreadable .json ({e})") from None
    text = _checked_text(_text_value(json_field(payload, opts.text_field), opts.text_field), opts.text_field)
  return {"kind": opts.kind, "source": opts.source, "category": "", "text": text, "images": [image]}


def read_webdataset(shard: Shard, opts: ConvertOptions) -> Iterator[tuple[str, dict | BadEntry]]:
  for key, members in _webdataset_samples(shard.path):
    try:
      yield key, _webdataset_record(members, opts)
    except BadEntry as e:
      yield key, e


# ------------------------------------------------------------------------------------------------------- parquet

def _parquet_image(cell: Any) -> Any:
  if isinstance(cell, dict):  # HF datasets Image feature: {"bytes": ..., "path": ...}
    if cell.get("bytes") is None:
      raise BadEntry("missing image", f"image struct has no bytes (path {cell.get('path')!r})")
    return cell["bytes"]
  if cell is None:
    raise BadEntry("missing image", "image cell is null")
  return cell


def image_cell(cell: Any, image_root: str, what: str) -> bytes:
  """An image given as a {"bytes", "path"} struct, raw bytes or a path under `image_root`, checked."""
  if isinstance(cell, dict):
    if cell.get("bytes"):
      return check_image(cell["bytes"], what)
    cell = cell.get("path")
  if isinstance(cell, (bytes, bytearray)):
    return check_image(cell, what)
  if isinstance(cell, str) and cell:
    if cell.startswith(("http://", "https://")):
      raise BadEntry("image is a URL", f"{what} {cell[:80]!r}: download the images first (bytes or local paths)")
    full = os.path.join(image_root, cell)
    try:
      with open(full, "rb") as f:
        data = f.read()
    except OSError as e:
      raise BadEntry("missing image file", f"{full}: {e.strerror or e}") from None
    return check_image(data, what)
  raise BadEntry("missing image", f"{what} is {type(cell).__name__}, not an image")


def _pair_record(row: dict, opts: ConvertOptions, image_root: str) -> dict:
  del image_root
  text = row[opts.text_column]
  if not isinstance(text, str):
    raise BadEntry("missing field", f"{opts.text_column!r} is {type(text).__name__}, not text")
  return {"kind": opts.kind, "source": opts.source, "category": "", "text": _checked_text(text, repr(opts.text_column)),
          "images": [check_image(_parquet_image(row[opts.image_column]), repr(opts.image_column))]}


def _text_record(row: dict, opts: ConvertOptions, image_root: str) -> dict:
  del image_root
  text = row.get(opts.text_column)
  if not isinstance(text, str):
    raise BadEntry("missing field", f"{opts.text_column!r} is {type(text).__name__}, not text")
  return {"kind": "text", "source": opts.source, "category": "", "text": _checked_text(text, repr(opts.text_column))}


def _interleaved_record(row: dict, opts: ConvertOptions, image_root: str) -> dict:
  """OBELICS: position i of the document is images[i] or texts[i] (the other null)."""
  images, texts = row.get(opts.image_column), row.get(opts.text_column)
  if not isinstance(images, list) or not isinstance(texts, list) or len(images) != len(texts):
    raise BadEntry("malformed document", f"{opts.image_column!r} and {opts.text_column!r} must be lists of equal "
                                         "length (OBELICS layout)")
  segments, blobs = [], []
  for i, (image, text) in enumerate(zip(images, texts)):
    if image is not None and text is not None:
      raise BadEntry("malformed document", f"position {i} holds both an image and a text")
    if image is not None:
      segments.append(len(blobs))
      blobs.append(image_cell(image, image_root, f"image at position {i}"))
    elif isinstance(text, str):
      if text.strip():
        segments.append(text)
    elif text is not None:
      raise BadEntry("missing field", f"text at position {i} is {type(text).__name__}")
  if not any(isinstance(seg, str) for seg in segments):
    raise BadEntry("missing field", "the document has no text")
  return {"kind": "interleaved", "source": opts.source, "category": "", "segments": segments, "images": blobs}


def _sft_record(row: dict, opts: ConvertOptions, image_root: str) -> dict:
  if "conversations" in row:  # LLaVA-OneVision: one image (or none) and LLaVA turns
    cell = row.get(opts.image_column)
    images = [] if cell is None else [image_cell(cell, image_root, repr(opts.image_column))]
    return {"kind": "sft", "source": opts.source, "category": opts.category,
            "messages": llava_messages(row["conversations"], len(images)), "images": images}
  turns = row.get("texts")  # the_cauldron: images first, then user / assistant pairs
  if not isinstance(turns, list) or not turns:
    raise BadEntry("missing field", "no 'texts' list of {user, assistant} turns")
  messages = []
  for turn in turns:
    if not isinstance(turn, dict) or not all(isinstance(turn.get(k), str) for k in ("user", "assistant")):
      raise BadEntry("missing field", f"malformed turn {str(turn)[:80]!r}")
    messages += [{"role": "user", "content": turn["user"]}, {"role": "assistant", "content": turn["assistant"]}]
  cells = row.get("images") or []
  images = [image_cell(c, image_root, f"image {i}") for i, c in enumerate(cells)]
  return {"kind": "sft", "source": opts.source, "category": opts.category,
          "messages": place_images(messages, len(images)), "images": images}


ROW_RECORDS = {"ocr": _pair_record, "caption": _pair_record, "text": _text_record,
               "interleaved": _interleaved_record, "sft": _sft_record}


def _columns(opts: ConvertOptions, names: list[str], path: str) -> list[str]:
  """The columns a parquet row of `opts.kind` needs; a missing one spoils the whole file."""
  flags = {opts.image_column: "--image-column", opts.text_column: "--text-column"}
  if opts.kind == "sft":
    if "conversations" in names:
      return ["conversations"] + ([opts.image_column] if opts.image_column in names else [])
    if "texts" in names:
      return ["texts"] + (["images"] if "images" in names else [])
    raise ValueError(f"{path}: neither the LLaVA-OneVision ('conversations') nor the_cauldron ('texts', 'images') "
                     f"layout (columns: {names})")
  wanted = [opts.text_column] if opts.kind == "text" else [opts.image_column, opts.text_column]
  for column in wanted:
    if column not in names:
      raise ValueError(f"{path}: {flags[column]} {column!r} is not a column (columns: {names})")
  return wanted


def _image_root(shard: Shard, opts: ConvertOptions) -> str:
  return opts.image_root or os.path.dirname(os.path.abspath(shard.path))


def read_parquet(shard: Shard, opts: ConvertOptions) -> Iterator[tuple[str, dict | BadEntry]]:
  import pyarrow.parquet as pq  # only this format needs pyarrow
  parquet = pq.ParquetFile(shard.path)
  columns = _columns(opts, parquet.schema_arrow.names, shard.path)
  make, root, row = ROW_RECORDS[opts.kind], _image_root(shard, opts), 0
  for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
    for item in batch.to_pylist():
      key = f"row {row}"
      row += 1
      try:
        yield key, make(item, opts, root)
      except BadEntry as e:
        yield key, e


def read_jsonl(shard: Shard, opts: ConvertOptions) -> Iterator[tuple[str, dict | BadEntry]]:
  make, root = ROW_RECORDS[opts.kind], _image_root(shard, opts)
  with open(shard.path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      key = f"line {line_number}"
      try:
        item = json.loads(line)
        if not isinstance(item, dict):
          raise BadEntry("missing field", f"line is a {type(item).__name__}, not an object")
        yield key, make(item, opts, root)
      except json.JSONDecodeError as e:
        yield key, BadEntry("missing field", f"not JSON ({e})")
      except BadEntry as e:
        yield key, e


# --------------------------------------------------------------------------------------------------------- llava

def load_llava_entries(path: str) -> list:
  """The entries of a LLaVA JSON list or JSONL file; an unparsable JSONL line becomes a BadEntry in place."""
  with open(path, "rb") as f:
    head = f.read(4096).lstrip()
  if head.startswith(b"["):
    with open(path, encoding="utf-8") as f:
      try:
        entries = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(entries, list):
      raise ValueError(f"{path}: expected a JSON list of conversations, got {type(entries).__name__}")
    return entries
  entries = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        entries.append(json.loads(line))
      except json.JSONDecodeError as e:
        entries.append(BadEntry("missing field", f"line {line_number} is not JSON ({e})"))
  return entries


def llava_messages(turns: Any, n_images: int) -> list[dict]:
  """LLaVA turns [{"from", "value"}] -> messages, the images' markers placed (place_images)."""
  return place_images(llava_turns(turns), n_images)


def llava_turns(turns: Any) -> list[dict]:
  """LLaVA turns [{"from", "value"}] -> messages, as written."""
  if not isinstance(turns, list) or not turns:
    raise BadEntry("missing field", "no 'conversations' list")
  messages = []
  for turn in turns:
    if not isinstance(turn, dict) or turn.get("from") not in LLAVA_ROLES or not isinstance(turn.get("value"), str):
      raise BadEntry("missing field", f"malformed turn {str(turn)[:80]!r}")
    messages.append({"role": LLAVA_ROLES[turn["from"]], "content": turn["value"]})
  return messages


def place_images(messages: list[dict], n_images: int) -> list[dict]:
  """Messages without image markers get them before the first question (LLaVA's convention); otherwise the
  markers must match the images."""
  markers = sum(m["content"].count(records.IMAGE_MARKER) for m in messages)
  if markers == 0 and n_images:
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if first_user is None:
      raise BadEntry("image markers", f"{n_images} images but no user turn to place them in")
    first_user["content"] = (records.IMAGE_MARKER + "\n") * n_images + first_user["content"]
  elif markers != n_images:
    raise BadEntry("image markers", f"{markers} {records.IMAGE_MARKER} markers but {n_images} images")
  return messages


def llava_record(entry: Any, opts: ConvertOptions) -> dict:
  if isinstance(entry, BadEntry):
    raise entry
  if not isinstance(entry, dict):
    raise BadEntry("missing field", f"entry is a {type(entry).__name__}, not an object")
  paths = entry.get("image", [])
  paths = [paths] if isinstance(paths, str) else paths
  if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
    raise BadEntry("missing field", f"'image' is {entry.get('image')!r}, not a path or a list of paths")
  messages = llava_messages(entry.get("conversations"), len(paths))
  images = []
  for rel in paths:
    full = os.path.join(opts.image_root, rel)
    try:
      with open(full, "rb") as f:
        data = f.read()
    except OSError as e:
      raise BadEntry("missing image file", f"{full}: {e.strerror or e}") from None
    images.append(check_image(data, rel))
  return {"kind": "sft", "source": opts.source, "category": opts.category, "messages": messages, "images": images}


def _read_entries(shard: Shard, opts: ConvertOptions, make_record) -> Iterator[tuple[str, dict | BadEntry]]:
  """(key, record or BadEntry) for the JSON entries of a shard; the key is the entry's "id" or its index."""
  for index, entry in enumerate(shard.entries, start=shard.start):
    key = str(entry["id"]) if isinstance(entry, dict) and "id" in entry else f"entry {index}"
    try:
      yield key, make_record(entry, opts)
    except BadEntry as e:
      yield key, e


def read_llava(shard: Shard, opts: ConvertOptions) -> Iterator[tuple[str, dict | BadEntry]]:
  return _read_entries(shard, opts, llava_record)


def llava_video_record(entry: Any, opts: ConvertOptions) -> dict:
  if isinstance(entry, BadEntry):
    raise entry
  if not isinstance(entry, dict):
    raise BadEntry("missing field", f"entry is a {type(entry).__name__}, not an object")
  rel = entry.get("video")
  if not isinstance(rel, str) or not rel:
    raise BadEntry("missing field", f"'video' is {rel!r}, not a path")
  messages = llava_turns(entry.get("conversations"))
  markers = sum(m["content"].count(records.IMAGE_MARKER) + m["content"].count(records.VIDEO_MARKER)
                for m in messages)
  if markers > 1:
    raise BadEntry("video markers", f"{markers} video markers for one video")
  for m in messages:
    m["content"] = m["content"].replace(records.IMAGE_MARKER, records.VIDEO_MARKER)
  if not markers:
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if first_user is None:
      raise BadEntry("video markers", "no user turn to place the video in")
    first_user["content"] = records.VIDEO_MARKER + "\n" + first_user["content"]
  full = os.path.join(opts.image_root, rel)
  try:
    with open(full, "rb") as f:
      data = f.read()
  except OSError as e:
    raise BadEntry("missing video file", f"{full}: {e.strerror or e}") from None
  try:
    images, video = video_lib.store_video(data, opts.video_frames, max_pixels=VIDEO_MAX_PIXELS, where=rel)
  except ValueError as e:
    raise BadEntry("unreadable video", str(e)) from None
  return {"kind": "sft", "source": opts.source, "category": opts.category, "messages": messages, "images": images,
          "video": video}


def read_llava_video(shard: Shard, opts: ConvertOptions) -> Iterator[tuple[str, dict | BadEntry]]:
  return _read_entries(shard, opts, llava_video_record)


def read_rico(shard: Shard, opts: ConvertOptions) -> Iterator[tuple[str, dict | BadEntry]]:
  from mm15_jax.data import convert_ui  # it builds on this module
  yield from convert_ui.read_rico(shard, opts)


READERS = {"webdataset": read_webdataset, "parquet": read_parquet, "llava": read_llava, "jsonl": read_jsonl,
           "llava-video": read_llava_video, "rico": read_rico}
