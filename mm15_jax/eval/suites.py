"""Benchmarks as data: a name, the paper's category, a metric and where the examples come from.

An example is a held-out sft record: one user turn whose "<image>" marks place the images, the reference
`answers` and the `metric` (see mm15_jax/data/records.py). Examples come from
  - a records dataset: split "test" of DATA_DIR/<name> (the synthetic held-out sets, or a public benchmark written
    by `mm15 eval import`, see adapters.py), or
  - a JSONL file, one example a line:
      {"image": "a.jpg" | ["a.jpg", "b.jpg"], "question": str, "answers": [str], "choices": [str] (optional)}
    image paths relative to the file. With "choices" the options are listed after the question as "A. ...", and
    an answer equal to a choice's text becomes that choice's letter (the "mc" metric compares letters). A video
    example has {"video": "clip.mp4"} instead of "image" (the file is stored; data/video.py samples its frames).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import string
from typing import Iterator, Sequence, Union

from etils import epath

from mm15_jax.data import records
from mm15_jax.eval import metrics, report as report_lib

IMAGE_MARK = records.IMAGE_MARKER
VIDEO_MARK = records.VIDEO_MARKER
PAPER_CATEGORIES = tuple(report_lib.CATEGORY_BENCHMARKS)
# SFT categories (the `category` field of records) -> the paper's evaluation categories. Knowledge gathers science
# and math; code and text-only data have no evaluation category of their own.
SFT_TO_PAPER = {"general": "General", "text_rich": "Text-rich", "refer_ground": "Refer&Ground",
                "science": "Knowledge", "math": "Knowledge", "multi_image": "Multi-image", "video": "Video", "ui": "UI"}
PAPER_TO_SFT = {"General": "general", "Text-rich": "text_rich", "Refer&Ground": "refer_ground",
                "Multi-image": "multi_image", "Video": "video", "UI": "ui"}
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def paper_category(category: str, where: str) -> str:
  """A record's category (an SFT category such as "text_rich", or a paper category) -> the paper's category."""
  if category in PAPER_CATEGORIES:
    return category
  if category in SFT_TO_PAPER:
    return SFT_TO_PAPER[category]
  raise ValueError(f"{where}: category {category!r} is neither one of the paper's evaluation categories "
                   f"{list(PAPER_CATEGORIES)} nor an SFT category that maps to one {sorted(SFT_TO_PAPER)}")


def record_category(category: str) -> str:
  """The `category` field written into records of a benchmark in paper category `category`."""
  paper_category(category, "record_category")
  return PAPER_TO_SFT.get(category, category)


def check_name(name: str) -> str:
  """Benchmark names become dataset folder names: letters, digits and _ . + - only."""
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise ValueError(f"benchmark name {name!r}: use letters, digits and _ . + - (starting with a letter or digit)")
  return name


def make_example(*, source: str, category: str, metric: str, question: str, answers: Sequence[str],
                 images: Sequence[bytes], choices: Sequence[str] | None = None, instruction: str = "",
                 where: str, video: dict | None = None, **extra) -> dict:
  """One held-out sft record: a single user turn "<image>\\n" * n_images + question (+ options, instruction).

  `category` is the paper's category (the record stores its SFT name where one exists). A question that already
  holds "<image>" marks keeps them; their count must match the images. With `video` (a video record's field,
  data/video.py) `images` are the video's stored images and the turn starts with "<video>\\n" instead. `extra`
  fields (ids) are kept as is.
  """
  if not isinstance(question, str) or not question.strip():
    raise ValueError(f"{where}: empty or missing question")
  if (isinstance(answers, str) or not answers
      or not all(isinstance(a, str) and a.strip() for a in answers)):
    raise ValueError(f"{where}: answers must be a non-empty list of non-empty strings, got {answers!r}")
  if metric not in metrics.METRICS:
    raise ValueError(f"{where}: unknown metric {metric!r}; known: {sorted(metrics.METRICS)}")
  answers = [a.strip() for a in answers]
  text = question.strip()
  if choices is not None:
    text, answers = _with_choices(text, answers, choices, where)
  if instruction:
    text = f"{text}\n{instruction}"
  marks = text.count(IMAGE_MARK)
  if video is not None:
    text = f"{VIDEO_MARK}\n{text}"
    records.check_video(video, [{"content": text}], marks, len(images), where)
    extra["video"] = video
  elif marks == 0:
    text = f"{IMAGE_MARK}\n" * len(images) + text
  elif marks != len(images):
    raise ValueError(f"{where}: the question has {marks} {IMAGE_MARK} marks but the example has {len(images)} "
                     "images")
  if metric in ("mc", "iou", "mme", "pope"):
    for answer in answers:  # a reference the metric cannot read would fail only at scoring time
      try:
        metrics.score(metric, answer, [answer])
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
  return {"kind": "sft", "source": source, "category": record_category(category),
          "messages": [{"role": "user", "content": text}], "images": [bytes(im) for im in images],
          "answers": answers, "metric": metric, **extra}


def with_support(query: dict, support: Sequence[dict]) -> dict:
  """A few-shot example (VL-ICL style): each support example as a user turn answered by its first reference, then
  the query's user turn; images in that order. Scored like the query."""
  messages, images = [], []
  for s in support:
    messages += [{"role": "user", "content": s["messages"][-1]["content"]},
                 {"role": "assistant", "content": s["answers"][0]}]
    images += list(s["images"])
  return {**query, "messages": messages + list(query["messages"]), "images": images + list(query["images"]),
          "shots": len(support)}


def _with_choices(question: str, answers: list[str], choices: Sequence[str], where: str) -> tuple[str, list[str]]:
  if isinstance(choices, str) or not choices or not all(isinstance(c, str) for c in choices):
    raise ValueError(f"{where}: choices must be a non-empty list of strings, got {choices!r}")
  if len(choices) > 26:
    raise ValueError(f"{where}: {len(choices)} choices; at most 26 (A..Z)")
  letters = string.ascii_uppercase[:len(choices)]
  options = "\n".join(f"{letter}. {choice.strip()}" for letter, choice in zip(letters, choices))
  by_text = {c.strip().lower(): letter for letter, c in zip(letters, choices)}
  mapped = []
  for answer in answers:
    if answer.upper() in letters and len(answer) == 1:
      mapped.append(answer.upper())
    elif answer.lower() in by_text:
      mapped.append(by_text[answer.lower()])
    else:
      raise ValueError(f"{where}: answer {answer!r} is neither an option letter ({letters}) nor one of the choices")
  return f"{question}\n{options}\n{MC_INSTRUCTION}", mapped


def read_image(path: str, where: str) -> bytes:
  """Encoded image bytes from a file (decoded, and checked, when the example is evaluated)."""
  try:
    raw = epath.Path(path).read_bytes()
  except OSError as e:
    raise FileNotFoundError(f"{where}: image {path} cannot be read ({e.strerror or e})") from e
  if not raw:
    raise ValueError(f"{where}: image {path} is empty")
  return raw


# ---------------------------------------------------------------------------------------------------------------
# Sources of examples.

@dataclasses.dataclass(frozen=True)
class RecordsSource:
  """Split `split` of the records dataset DATA_DIR/<name>."""
  data_dir: str
  name: str
  split: str = "test"

  def load(self) -> Sequence[dict]:
    return records.open_source(self.data_dir, self.name, self.split)

  def __str__(self) -> str:
    return f"{self.data_dir}/{self.name}[{self.split}]"


@dataclasses.dataclass(frozen=True)
class JsonlSource:
  """A JSONL file of examples (module docstring); `category` and `metric` are those of its benchmark."""
  path: str
  source: str
  category: str
  metric: str

  def load(self) -> list[dict]:
    return read_jsonl(self.path, source=self.source, category=self.category, metric=self.metric)

  def __str__(self) -> str:
    return self.path


def json_objects(path: str, lines: Sequence[str]) -> Iterator[tuple[str, dict]]:
  """(where, object) for each non-blank line of a JSONL file; a line that is not a JSON object raises, naming it."""
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path}:{n}"
    try:
      item = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(item, dict):
      raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
    yield where, item


def read_jsonl(path: str, *, source: str, category: str, metric: str, instruction: str = "") -> list[dict]:
  """The examples of a JSONL benchmark file as held-out sft records; errors name the file and line."""
  root = epath.Path(path).parent
  out = []
  try:
    lines = epath.Path(path).read_text(encoding="utf-8").splitlines()
  except OSError as e:
    raise FileNotFoundError(f"benchmark file {path} cannot be read ({e.strerror or e})") from e
  for where, item in json_objects(path, lines):
    unknown = set(item) - {"image", "video", "question", "answers", "choices", "id"}
    if unknown:
      raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
    paths = item.get("image", [])
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
      raise ValueError(f"{where}: field 'image' must be a path or a list of paths, got {item.get('image')!r}")
    extra = {"example_id": item["id"]} if "id" in item else {}
    if "video" in item:
      if paths or not isinstance(item["video"], str) or not item["video"]:
        raise ValueError(f"{where}: field 'video' must be one path, and an example has a video or images")
      paths, extra["video"] = [item["video"]], {"form": "file"}
    images = [read_image(os.fspath(root / p), where) for p in paths]
    out.append(make_example(source=source, category=category, metric=metric, question=item.get("question"),
                            answers=item.get("answers"), images=images, choices=item.get("choices"),
                            instruction=instruction, where=where, **extra))
  if not out:
    raise ValueError(f"benchmark file {path} holds no examples")
  return out


Source = Union[RecordsSource, JsonlSource]


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks.

@dataclasses.dataclass(frozen=True)
class Benchmark:
  name: str
  category: str     # one of the paper's categories (report.CATEGORY_BENCHMARKS)
  metric: str       # a metrics.METRICS name
  source: Source

  def __post_init__(self):
    check_name(self.name)
    if self.category not in PAPER_CATEGORIES:
      raise ValueError(f"benchmark {self.name!r}: category {self.category!r} is not one of {list(PAPER_CATEGORIES)}")
    if self.metric not in metrics.METRICS:
      raise ValueError(f"benchmark {self.name!r}: unknown metric {self.metric!r}; known: {sorted(metrics.METRICS)}")

  def examples(self, max_examples: int = 0) -> list[dict]:
    """The first `max_examples` examples (0: all), each checked to be a scorable held-out sft record."""
    loaded = self.source.load()
    count = min(len(loaded), max_examples) if max_examples else len(loaded)
    out = []
    for i in range(count):
      record, where = loaded[i], f"benchmark {self.name} ({self.source}) example {i}"
      if record.get("kind") != "sft" or not record.get("answers"):
        raise ValueError(f"{where}: not a held-out sft record (kind {record.get('kind')!r}, no answers)")
      if record.get("metric", self.metric) != self.metric:
        raise ValueError(f"{where}: metric {record['metric']!r}, but the benchmark is scored with {self.metric!r}")
      out.append(record)
    if not out:
      raise ValueError(f"benchmark {self.name} ({self.source}) has no examples")
    return out


def from_records(data_dir: str, name: str, split: str = "test", *, category: str | None = None,
                 metric: str | None = None) -> Benchmark:
  """A benchmark over a records dataset; category and metric default to those of its first record."""
  source = RecordsSource(str(data_dir), name, split)
  if category is None or metric is None:
    loaded = source.load()
    if not len(loaded):
      raise ValueError(f"benchmark {name}: {source} is empty")
    first = loaded[0]
    if "metric" not in first:
      raise ValueError(f"benchmark {name}: {source}[0] has no metric (not a held-out split)")
    category = category or paper_category(first["category"], f"{source}[0]")
    metric = metric or first["metric"]
  return Benchmark(name, category, metric, source)


def from_jsonl(path: str, *, category: str, metric: str, name: str | None = None) -> Benchmark:
  """A benchmark over a JSONL file; the name defaults to the file's stem."""
  name = name or os.path.splitext(os.path.basename(path))[0]
  return Benchmark(name, category, metric, JsonlSource(path, name, category, metric))


def available(data_dir: str) -> list[str]:
  """Datasets under `data_dir` that have a "test" split, sorted."""
  return [name for name in records.list_sources(data_dir) if _has_split(data_dir, name, "test")]


def has_train_split(source: Source) -> bool:
  return isinstance(source, RecordsSource) and _has_split(source.data_dir, source.name, "train")


def _has_split(data_dir: str, name: str, split: str) -> bool:
  try:
    records.open_source(data_dir, name, split)
    return True
  except (FileNotFoundError, ValueError):
    return False


def select(data_dir: str, names: str | Sequence[str] | None = None) -> list[Benchmark]:
  """Benchmarks of `data_dir` by name ("a,b" or a list; empty or None: every dataset with a "test" split).

  An unknown name is an error naming it and listing what `data_dir` holds.
  """
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  known = available(data_dir)
  if not names:
    if not known:
      raise ValueError(f"no benchmarks under {data_dir}: no dataset there has a 'test' split")
    return [from_records(data_dir, n) for n in known]
  duplicates = sorted({n for n in names if list(names).count(n) > 1})
  if duplicates:
    raise ValueError(f"benchmark(s) {duplicates} selected more than once")
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"unknown benchmark(s) {unknown}: {data_dir} has test splits of {known}")
  return [from_records(data_dir, n) for n in names]


def category_table(benchmarks: Sequence[Benchmark]) -> dict[str, list[str]]:
  """The paper's category table with every evaluated benchmark added to its category (if not already listed)."""
  table = {c: list(names) for c, names in report_lib.CATEGORY_BENCHMARKS.items()}
  listed = {n: c for c, names in table.items() for n in names}
  for b in benchmarks:
    if b.name in listed and listed[b.name] != b.category:
      raise ValueError(f"benchmark {b.name!r} is in category {b.category!r}, but the paper lists it under "
                       f"{listed[b.name]!r}")
    if b.name not in listed:
      table[b.category].append(b.name)
      listed[b.name] = b.category
  return table
