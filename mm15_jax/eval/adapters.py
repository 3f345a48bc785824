"""Public benchmark files -> held-out sft records (benchmarks.make_example), and their import as records datasets.

  format   annotation file(s) (--input)                         images (--images, default: the file's folder)
  textvqa  TextVQA_0.5.1_val.json: data[] {image_id, question,   train_images/<image_id>.jpg
           answers[10]}                       metric vqa
  docvqa   val_v1.0.json / val.json: data[] {image              <image> as written ("documents/x.png")
           "documents/x.png", question, answers}   metric anls
  chartqa  test_human.json / test_augmented.json: list of       png/<imgname>
           {imgname, query, label}             metric relaxed
  refcoco  refs(unc).p (pickle; --instances: instances.json     <file_name of the image in instances.json>
           beside it by default)               metric iou       (COCO train2014)
  jsonl    benchmarks.py's JSONL format        --metric, --category
A RefCOCO ref gives one example per sentence: "Where is <sentence>? Answer with a box.", answered by the ref's
annotation box [x, y, w, h] (pixels) as "[x1, y1, x2, y2]" on the 0..1000 grid of the whole image.

`import_benchmark` writes the examples as split "test" of dataset DATA_DIR/<name> (records.write_source).
"""
from __future__ import annotations

import itertools
import json
import os
import pickle
from typing import Callable, Iterable, Iterator, Sequence

from mm15_jax import paths
from mm15_jax.data import records
from mm15_jax.eval import benchmarks as bench

REFER_PROMPT = "Where is {}? Answer with a box."
GRID = 1000


def _load_json(path: str):
  try:
    with paths.path(path).open(encoding="utf-8") as f:
      return json.load(f)
  except OSError as e:
    raise FileNotFoundError(f"annotation file {path} cannot be read ({e.strerror or e})") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"annotation file {path} is not JSON ({e.msg}, line {e.lineno})") from None


def _data_list(path: str, what: str) -> list:
  """The `data` list of a TextVQA / DocVQA annotation file."""
  content = _load_json(path)
  if not isinstance(content, dict) or not isinstance(content.get("data"), list):
    raise ValueError(f"{path}: not a {what} annotation file (expected an object with a 'data' list)")
  return content["data"]


def _field(item, key: str, types, where: str):
  if not isinstance(item, dict) or key not in item:
    raise ValueError(f"{where}: missing field {key!r}")
  if not isinstance(item[key], types):
    raise ValueError(f"{where}: field {key!r} is {type(item[key]).__name__}")
  return item[key]


def _find_image(images_dir: str, candidates: Sequence[str], where: str) -> bytes:
  """The first of `candidates` (relative to images_dir) that exists; the error names the first."""
  for relative in candidates:
    path = paths.join(images_dir, relative)
    if paths.path(path).is_file():
      return bench.read_image(path, where)
  raise FileNotFoundError(f"{where}: image {paths.join(images_dir, candidates[0])} not found")


def textvqa_examples(path: str, images_dir: str, *, name: str = "TextVQA", instruction: str = "") -> Iterator[dict]:
  for i, item in enumerate(_data_list(path, "TextVQA")):
    where = f"{path} data[{i}]"
    image_id = _field(item, "image_id", str, where)
    image = _find_image(images_dir, [f"train_images/{image_id}.jpg", f"{image_id}.jpg"], where)
    yield bench.make_example(source=name, category="Text-rich", metric="vqa",
                             question=_field(item, "question", str, where),
                             answers=_field(item, "answers", list, where), images=[image], instruction=instruction,
                             where=where, example_id=item.get("question_id", i))


def docvqa_examples(path: str, images_dir: str, *, name: str = "DocVQA", instruction: str = "") -> Iterator[dict]:
  for i, item in enumerate(_data_list(path, "DocVQA")):
    where = f"{path} data[{i}]"
    if "answers" not in item:
      raise ValueError(f"{where}: no answers (the DocVQA test split is scored by the official server only)")
    relative = _field(item, "image", str, where)
    image = _find_image(images_dir, [relative, os.path.basename(relative)], where)
    yield bench.make_example(source=name, category="Text-rich", metric="anls",
                             question=_field(item, "question", str, where),
                             answers=_field(item, "answers", list, where), images=[image], instruction=instruction,
                             where=where, example_id=item.get("questionId", i))


def chartqa_examples(path: str, images_dir: str, *, name: str = "ChartQA", instruction: str = "") -> Iterator[dict]:
  content = _load_json(path)
  if not isinstance(content, list):
    raise ValueError(f"{path}: not a ChartQA annotation file (expected a list of {{imgname, query, label}})")
  for i, item in enumerate(content):
    where = f"{path}[{i}]"
    imgname = _field(item, "imgname", str, where)
    label = _field(item, "label", (str, int, float), where)
    image = _find_image(images_dir, [f"png/{imgname}", imgname], where)
    yield bench.make_example(source=name, category="Text-rich", metric="relaxed",
                             question=_field(item, "query", str, where), answers=[str(label)], images=[image],
                             instruction=instruction, where=where, example_id=f"{os.path.basename(path)}:{i}")


def box_to_grid(bbox_xywh: Sequence[float], width: int, height: int) -> list[int]:
  """COCO [x, y, w, h] in pixels -> [x1, y1, x2, y2] on the 0..1000 grid of the whole image (rounded, clipped)."""
  x, y, w, h = (float(v) for v in bbox_xywh)
  corners = ((x, width), (y, height), (x + w, width), (y + h, height))
  return [min(GRID, max(0, int(round(v * GRID / extent)))) for v, extent in corners]


class _PlainUnpickler(pickle.Unpickler):
  """Refs files hold only lists, dicts, strings and numbers: refuse every class (no code runs on load)."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"refuses to load {module}.{name}")


def refcoco_examples(path: str, images_dir: str, *, instances: str = "", split: str = "val", name: str = "RefCOCO",
                     instruction: str = "") -> Iterator[dict]:
  """One example per sentence of every ref in `split` (RefCOCO/+: val, testA, testB; RefCOCOg: val, test)."""
  try:
    with paths.path(path).open("rb") as f:
      refs = _PlainUnpickler(f, encoding="utf-8", errors="replace").load()  # Python 2 str -> str
  except OSError as e:
    raise FileNotFoundError(f"refs file {path} cannot be read ({e.strerror or e})") from e
  except (pickle.UnpicklingError, EOFError, ValueError) as e:
    raise ValueError(f"refs file {path} is not a refs pickle ({e})") from None
  if not isinstance(refs, list):
    raise ValueError(f"{path}: expected a list of refs, got {type(refs).__name__}")
  instances = instances or os.fspath(paths.path(path).parent / "instances.json")
  content = _load_json(instances)
  if not isinstance(content, dict) or "images" not in content or "annotations" not in content:
    raise ValueError(f"{instances}: not a COCO instances file (expected 'images' and 'annotations')")
  images = {im["id"]: im for im in content["images"]}
  annotations = {ann["id"]: ann for ann in content["annotations"]}
  selected = [r for r in refs if isinstance(r, dict) and r.get("split") == split]
  if not selected:
    splits = sorted({str(r.get("split")) for r in refs if isinstance(r, dict)})
    raise ValueError(f"{path}: no refs in split {split!r} (splits: {splits})")
  for ref in selected:
    where = f"{path} ref_id {ref.get('ref_id')}"
    ann_id, image_id = _field(ref, "ann_id", int, where), _field(ref, "image_id", int, where)
    if ann_id not in annotations:
      raise ValueError(f"{where}: annotation {ann_id} not in {instances}")
    if image_id not in images:
      raise ValueError(f"{where}: image {image_id} not in {instances}")
    image_info = images[image_id]
    box = box_to_grid(_field(annotations[ann_id], "bbox", list, f"{instances} annotation {ann_id}"),
                      _field(image_info, "width", int, f"{instances} image {image_id}"),
                      _field(image_info, "height", int, f"{instances} image {image_id}"))
    file_name = _field(image_info, "file_name", str, f"{instances} image {image_id}")
    image = _find_image(images_dir, [file_name, f"train2014/{file_name}"], where)
    answer = "[" + ", ".join(str(v) for v in box) + "]"
    for k, sentence in enumerate(_field(ref, "sentences", list, where)):
      text = sentence.get("sent") or sentence.get("raw") if isinstance(sentence, dict) else None
      if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: sentence {k} has no text")
      yield bench.make_example(source=name, category="Refer&Ground", metric="iou",
                               question=REFER_PROMPT.format(text.strip()), answers=[answer], images=[image],
                               instruction=instruction, where=f"{where} sentence {k}",
                               example_id=sentence.get("sent_id", f"{ref.get('ref_id')}:{k}"))


def jsonl_examples(path: str, images_dir: str, *, name: str, category: str, metric: str,
                   instruction: str = "") -> Iterator[dict]:
  del images_dir  # JSONL image paths are relative to the file
  yield from bench.read_jsonl(path, source=name, category=category, metric=metric, instruction=instruction)


FORMATS: dict[str, Callable[..., Iterator[dict]]] = {
    "textvqa": textvqa_examples, "docvqa": docvqa_examples, "chartqa": chartqa_examples,
    "refcoco": refcoco_examples, "jsonl": jsonl_examples,
}


def examples(fmt: str, inputs: Sequence[str], *, images_dir: str = "", name: str, max_examples: int = 0,
             **options) -> Iterator[dict]:
  """Examples of every input file of format `fmt`, in order; at most `max_examples` (0: all)."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown benchmark format {fmt!r}; known: {sorted(FORMATS)}")
  if not inputs:
    raise ValueError(f"format {fmt}: no input file given")
  count = 0
  for path in inputs:
    for example in FORMATS[fmt](path, images_dir or os.path.dirname(paths.absolute(path)), name=name, **options):
      if max_examples and count >= max_examples:
        return
      count += 1
      yield example


def import_benchmark(fmt: str, inputs: Sequence[str], *, out_dir: str, name: str, images_dir: str = "",
                     max_examples: int = 0, overwrite: bool = False, **options) -> int:
  """Writes the examples as split "test" of dataset `out_dir/name`; returns how many were written."""
  bench.check_name(name)
  if not overwrite and name in (records.list_sources(out_dir) if paths.path(out_dir).is_dir() else []):
    raise FileExistsError(f"dataset {name!r} already exists under {out_dir} (pass overwrite to replace it)")
  stream = examples(fmt, inputs, images_dir=images_dir, name=name, max_examples=max_examples, **options)
  first = next(stream, None)  # reads and checks before anything is written
  if first is None:
    raise ValueError(f"format {fmt}: {list(inputs)} produced no examples")
  count = [0]

  def counted(items: Iterable[dict]) -> Iterator[dict]:
    for item in items:
      count[0] += 1
      yield item

  records.write_source(out_dir, name, {"test": counted(itertools.chain([first], stream))},
                       description=f"{name} ({fmt}) evaluation examples")
  return count[0]
