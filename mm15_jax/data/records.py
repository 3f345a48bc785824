"""Storage of data records as TFDS datasets in ArrayRecord format, written and read without TensorFlow.

A record on disk has two features: "json", the UTF-8 JSON of every field except the images, and "images", a
sequence of encoded image bytes (PNG/JPEG, decoded later in the pipeline). Both are `tfds.features.Tensor` of
dtype object, which TFDS encodes and decodes with numpy alone. Datasets live at DATA_DIR/<name>/<version>/ and
are read back with random access (`as_data_source`), so a reader is a Grain MapDataset source.

Decoded record (the shared contract):
  kind: caption | interleaved | text | ocr | sft; source: dataset name; category: SFT category or "".
  images: list[bytes]
  caption/ocr/text: text; interleaved: segments (str | int image index); sft: messages [{role, content}]
  held-out sft records: answers (list[str]) and metric.
  video sft records (data/video.py): video = {"form": "file"} (images: the video file's bytes) or {"form": "frames",
    "timestamps": [seconds per frame]} (images: the frames in temporal order); one "<video>" mark, no "<image>".
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from mm15_jax import errors, paths

VERSION = "1.0.0"
KINDS = ("caption", "interleaved", "text", "ocr", "sft")
ROLES = ("user", "assistant", "system")
METRICS = ("exact", "vqa", "anls", "relaxed", "iou", "mc", "mme", "pope", "cider")
IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
VIDEO_FORMS = ("file", "frames")

_FEATURES = tfds.features.FeaturesDict({
    "json": tfds.features.Tensor(shape=(), dtype=np.object_),
    "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
})


class _RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builds one dataset from in-memory iterables of encoded examples, one per split."""

  VERSION = tfds.core.Version(VERSION)
  # No checksums file next to this module; the base class would look one up through `importlib_resources`.
  code_path = None

  def __init__(self, *, name: str, splits: dict[str, Iterable[tuple[int, dict]]], description: str, **kwargs):
    self.name = name
    self._splits = splits
    self._description = description
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # disable_shuffling keeps index i == i-th written record, so a build is reproducible record by record.
    return tfds.core.DatasetInfo(builder=self, description=self._description, features=_FEATURES,
                                 disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return dict(self._splits)

  def _generate_examples(self):
    raise NotImplementedError("examples come from _split_generators")

  def _log_download_bytes(self) -> None:  # quiet: the caller reports progress
    pass

  def _log_download_done(self) -> None:
    pass


def encode_record(record: dict[str, Any]) -> dict[str, Any]:
  """Record dict -> on-disk example {"json": bytes, "images": list[bytes]}."""
  fields = {k: v for k, v in record.items() if k != "images"}
  images = [bytes(im) for im in record.get("images", [])]
  return {"json": json.dumps(fields, ensure_ascii=False, sort_keys=True).encode("utf-8"), "images": images}


def _examples(records: Iterable[dict], where: str) -> Iterator[tuple[int, dict]]:
  for i, record in enumerate(records):
    # Validate before writing: a bad generator must fail here, not when a trainer reads it much later.
    example = encode_record(record)
    decode_record(example, where=f"{where}[{i}]")
    yield i, example


def write_source(data_dir: str | epath.PathLike, name: str, splits: dict[str, Iterable[dict]], *,
                 description: str = "") -> None:
  """Writes `splits` (split name -> records) as dataset `name` under `data_dir`, replacing an existing one.

  ArrayRecord writes local files only (it reads gs:// directly): on an object store the dataset is built in a
  temporary local folder and uploaded once complete.
  """
  if not splits:
    raise ValueError(f"write_source({data_dir}, {name}): no splits given")
  generators = {split: _examples(records, f"{name}/{split}") for split, records in splits.items()}
  target = epath.Path(data_dir) / name
  with tempfile.TemporaryDirectory() as scratch:
    build_dir = data_dir if paths.is_local(data_dir) else os.path.join(scratch, "data")
    if target.exists():
      target.rmtree()
    builder = _RecordBuilder(name=name, splits=generators, description=description or name,
                             data_dir=str(build_dir), file_format="array_record")
    tqdm_utils = tfds.core.utils.tqdm_utils
    was_active = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:  # the download dir keeps an empty downloads/ out of data_dir
      builder.download_and_prepare(file_format="array_record", download_dir=os.path.join(scratch, "downloads"))
    finally:
      tfds.display_progress_bar(was_active)
    if not paths.is_local(data_dir):
      paths.upload_tree(os.path.join(build_dir, name), target)


def _version_dir(data_dir: epath.Path, name: str) -> epath.Path | None:
  root = data_dir / name
  if not root.is_dir():
    return None
  versions = [d for d in root.iterdir() if (d / "dataset_info.json").exists()]
  if not versions:
    return None
  return max(versions, key=lambda d: tfds.core.Version(d.name))


def list_sources(data_dir: str | epath.PathLike) -> list[str]:
  """Names of the datasets stored under `data_dir`, sorted."""
  root = epath.Path(data_dir)
  try:
    found = root.is_dir()
  except Exception as e:  # credentials, permission: each object-store client raises its own types
    raise paths.storage_error(data_dir, e, what="data dir") from e
  if not found:
    raise paths.storage_error(data_dir, FileNotFoundError(os.fspath(root)), what="data dir")
  return sorted(d.name for d in root.iterdir() if d.is_dir() and _version_dir(root, d.name) is not None)


class RecordSource:
  """Random-access sequence of the records of one split; a Grain MapDataset source.

  With decode=True items are validated record dicts (a bad record raises ValueError naming it); with
  decode=False items are the raw {"json", "images"} examples, to be passed to `decode_record` by a pipeline that
  skips and counts bad records. Picklable: the ArrayRecord reader is reopened lazily in each process.
  """

  def __init__(self, data_dir: str | epath.PathLike, name: str, split: str, *, decode: bool = True):
    self.data_dir, self.name, self.split, self.decode = str(data_dir), name, split, decode
    try:
      version_dir = _version_dir(epath.Path(data_dir), name)
    except Exception as e:  # credentials, permission: each object-store client raises its own types
      raise paths.storage_error(data_dir, e, what="data dir") from e
    if version_dir is None:
      known = list_sources(data_dir) if epath.Path(data_dir).is_dir() else []
      raise FileNotFoundError(f"dataset {name!r} not found under data dir {data_dir} (found: {known})")
    self._version_dir = str(version_dir)
    splits = tfds.builder_from_directory(self._version_dir).info.splits
    if split not in splits:
      raise ValueError(f"dataset {name!r} under {data_dir} has no split {split!r} (splits: {sorted(splits)})")
    self._len = splits[split].num_examples
    self._source = None

  def _reader(self):
    if self._source is None:
      self._source = tfds.builder_from_directory(self._version_dir).as_data_source(split=self.split)
    return self._source

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"{self.name}/{self.split}[{index}] out of range (len {self._len})")
    try:
      raw = self._reader()[index]
      if raw is None:
        raise ValueError("the reader returned nothing")
    except Exception as e:  # pylint: disable=broad-except (Riegeli/ArrayRecord errors name no dataset or file)
      raise ValueError(f"{self.name}/{self.split}[{index}]: cannot read the record from {self._file_of(index)} "
                       f"({errors.root_cause(e)}); the file is damaged or truncated: rebuild or re-copy dataset "
                       f"{self.name!r}") from e
    return decode_record(raw, where=f"{self.name}/{self.split}[{index}]") if self.decode else raw

  def _file_of(self, index: int) -> str:
    """The ArrayRecord shard file holding record `index`."""
    info = tfds.builder_from_directory(self._version_dir).info.splits[self.split]
    ends = np.cumsum(info.shard_lengths)
    return str(info.filepaths[int(np.searchsorted(ends, index, side="right"))])

  def __iter__(self) -> Iterator[dict[str, Any]]:
    for i in range(self._len):
      yield self[i]

  def __getstate__(self):
    return {**self.__dict__, "_source": None}

  def __repr__(self) -> str:
    return f"RecordSource({self.data_dir}, {self.name}/{self.split}, len={self._len})"


def open_source(data_dir: str | epath.PathLike, name: str, split: str, *, decode: bool = True) -> RecordSource:
  """Opens split `split` of dataset `name` under `data_dir` for random access."""
  return RecordSource(data_dir, name, split, decode=decode)


def require_field(fields: dict, key: str, types, where: str):
  """fields[key], checked to be of `types`; errors name `where` (dataset/split[index]) and the field."""
  if key not in fields:
    raise ValueError(f"{where}: missing field {key!r} (kind {fields.get('kind')!r})")
  value = fields[key]
  if not isinstance(value, types):
    raise ValueError(f"{where}: field {key!r} has type {type(value).__name__}")
  return value


def check_video(video: Any, messages: list, n_image_markers: int, n_images: int, where: str) -> None:
  """The `video` field of an sft record, its marks and its stored images (see the module docstring)."""
  if not isinstance(video, dict) or video.get("form") not in VIDEO_FORMS:
    raise ValueError(f"{where}: field 'video' must be an object with form one of {VIDEO_FORMS}, got {video!r:.80}")
  n_video_markers = sum(m["content"].count(VIDEO_MARKER) for m in messages)
  if n_video_markers != 1 or n_image_markers:
    raise ValueError(f"{where}: a video record needs one {VIDEO_MARKER} marker and no {IMAGE_MARKER} marker, got "
                     f"{n_video_markers} and {n_image_markers}")
  if video["form"] == "file":
    if n_images != 1:
      raise ValueError(f"{where}: a video of form 'file' stores the file as its one image, got {n_images}")
    return
  timestamps = video.get("timestamps")
  if not n_images:
    raise ValueError(f"{where}: a video of form 'frames' without frames")
  if not isinstance(timestamps, list) or len(timestamps) != n_images:
    raise ValueError(f"{where}: video timestamps must be a list with one entry per frame ({n_images} frames)")
  if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0 for t in timestamps):
    raise ValueError(f"{where}: video timestamps must be numbers >= 0 (seconds)")
  if any(b < a for a, b in zip(timestamps, timestamps[1:])):
    raise ValueError(f"{where}: video timestamps are not in temporal order")


def decode_record(raw: dict[str, Any], *, where: str) -> dict[str, Any]:
  """On-disk example -> validated record dict; raises ValueError naming `where` ("dataset/split[index]")."""
  try:
    payload = raw["json"]
    if isinstance(payload, np.ndarray):
      payload = payload.item()
    fields = json.loads(payload.decode("utf-8") if isinstance(payload, bytes) else payload)
  except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{where}: unreadable record json ({e})") from e
  if not isinstance(fields, dict):
    raise ValueError(f"{where}: record json is a {type(fields).__name__}, not an object")
  images = [bytes(im) for im in raw.get("images", [])]
  if any(not im for im in images):
    raise ValueError(f"{where}: empty image bytes")
  kind = require_field(fields, "kind", str, where)
  if kind not in KINDS:
    raise ValueError(f"{where}: unknown kind {kind!r}")
  require_field(fields, "source", str, where)
  fields.setdefault("category", "")
  require_field(fields, "category", str, where)
  if kind in ("caption", "ocr", "text"):
    require_field(fields, "text", str, where)
    want = 0 if kind == "text" else 1
    if len(images) != want:
      raise ValueError(f"{where}: {kind} record has {len(images)} images, expected {want}")
  elif kind == "interleaved":
    segments = require_field(fields, "segments", list, where)
    for s in segments:
      if isinstance(s, bool) or not isinstance(s, (str, int)):
        raise ValueError(f"{where}: interleaved segment {s!r} is neither text nor an image index")
      if isinstance(s, int) and not 0 <= s < len(images):
        raise ValueError(f"{where}: image index {s} out of range ({len(images)} images)")
  else:
    messages = require_field(fields, "messages", list, where)
    n_markers = 0
    for m in messages:
      if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
        raise ValueError(f"{where}: malformed message {m!r}")
      n_markers += m["content"].count(IMAGE_MARKER)
    if "video" in fields:
      check_video(fields["video"], messages, n_markers, len(images), where)
    elif n_markers != len(images):
      raise ValueError(f"{where}: {n_markers} {IMAGE_MARKER} markers but {len(images)} images")
    if "answers" in fields or "metric" in fields:
      answers = require_field(fields, "answers", list, where)
      if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: answers must be a non-empty list of strings")
      if require_field(fields, "metric", str, where) not in METRICS:
        raise ValueError(f"{where}: unknown metric {fields['metric']!r}")
  fields["images"] = images
  return fields
