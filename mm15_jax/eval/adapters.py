"""Public benchmark files -> held-out sft records (suites.make_example), and their import as records datasets.

  format   annotation file(s) (--input)                         images (--images, default: the file's folder)
  textvqa  TextVQA_0.5.1_val.json: data[] {image_id, question,   train_images/<image_id>.jpg
           answers[10]}                       metric vqa
  docvqa   val_v1.0.json / val.json: data[] {image              <image> as written ("documents/x.png")
           "documents/x.png", question, answers}   metric anls
  chartqa  test_human.json / test_augmented.json: list of       png/<imgname>
           {imgname, query, label}             metric relaxed
  refcoco  refs(unc).p (pickle; --instances: instances.json     <file_name of the image in instances.json>
           beside it by default)               metric iou       (COCO train2014)
  jsonl    suites.py's JSONL format            --metric, --category
  mme      the MME release folder: one folder per subtask,      beside the .txt (or under images/)
           <image>.txt (or questions_answers_YN/<image>.txt)
           of "question<TAB>Yes|No" lines     metric mme (acc, acc+ per subtask; summaries.py)
  pope     coco_pope_<split>.json: JSON lines {question_id,     <image> (COCO val2014)
           image, text, label}; split from "category" or the file name   metric pope (F1 per split)
  multi_mc multiple choice over several images (MuirBench,      images in the row ({"bytes"} structs, bytes) or
           BLINK): parquet or JSONL rows {question, options |   paths relative to --images
           choices, answer, image_list | images | image_1..n,
           task | sub_task}                    metric mc, category Multi-image
  videomme Video-MME: parquet or JSONL rows {videoID, question,   <videoID>.mp4 (or .mkv/.webm/.avi/.mov, also
           options ["A. ...", ...], answer letter, duration,   under data/ or videos/)
           task_type}                          metric mc, category Video, subset = duration
  video_mc multiple choice over a video (MVBench style): JSON     paths relative to --images
           list, JSONL or parquet rows {video, question,
           options | candidates, answer (letter or option text),
           task}                               metric mc, category Video (--category)
Video examples (data/video.py) store the video file (`frames` 0, its first frame checked to decode) or `frames`
uniformly sampled JPEG frames with their timestamps.
A RefCOCO ref gives one example per sentence: "Where is <sentence>? Answer with a box.", answered by the ref's
annotation box [x, y, w, h] (pixels) as "[x1, y1, x2, y2]" on the 0..1000 grid of the whole image.

Each format appends its default instruction to every question (`default_instruction`: a single word or phrase for
open answers, as the usual zero-shot protocol asks; none where the question or the options already say how to
answer); `instruction` overrides it ("" for none). With `shots` k > 0 every query is preceded by k examples drawn
from `support` files of the same format (VL-ICL's few-shot protocol), each a user turn and its answer.

`import_benchmark` writes the examples as split "test" of dataset DATA_DIR/<name> (records.write_source).
"""
from __future__ import annotations

import itertools
import json
import os
import pickle
import random
from typing import Callable, Iterable, Iterator, Sequence

from mm15_jax import paths
from mm15_jax.data import records
from mm15_jax.data import video as video_lib
from mm15_jax.eval import suites

REFER_PROMPT = "Where is {}? Answer with a box."
GRID = 1000
SHORT_ANSWER = "Answer the question using a single word or phrase."
# The instruction appended to each question by default; "" where the question or its options already say how to
# answer (MME's questions end in "Please answer yes or no.", multiple choice gets suites.MC_INSTRUCTION).
DEFAULT_INSTRUCTIONS = {"textvqa": SHORT_ANSWER, "docvqa": SHORT_ANSWER, "chartqa": SHORT_ANSWER, "refcoco": "",
                        "mme": "", "pope": SHORT_ANSWER, "multi_mc": "", "videomme": "", "video_mc": ""}
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
VIDEO_MAX_PIXELS = 64_000_000  # per frame, as data.max_image_pixels
YES_NO = ("yes", "no")


def default_instruction(fmt: str, metric: str = "") -> str:
  """The instruction a format appends by default (jsonl: the short-answer one unless the metric is mc/iou/mme)."""
  if fmt == "jsonl":
    return "" if metric in ("mc", "iou", "mme") else SHORT_ANSWER
  return DEFAULT_INSTRUCTIONS[fmt]


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
      return suites.read_image(path, where)
  raise FileNotFoundError(f"{where}: image {paths.join(images_dir, candidates[0])} not found")


def textvqa_examples(path: str, images_dir: str, *, name: str = "TextVQA", instruction: str = "") -> Iterator[dict]:
  for i, item in enumerate(_data_list(path, "TextVQA")):
    where = f"{path} data[{i}]"
    image_id = _field(item, "image_id", str, where)
    image = _find_image(images_dir, [f"train_images/{image_id}.jpg", f"{image_id}.jpg"], where)
    yield suites.make_example(source=name, category="Text-rich", metric="vqa",
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
    yield suites.make_example(source=name, category="Text-rich", metric="anls",
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
    yield suites.make_example(source=name, category="Text-rich", metric="relaxed",
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
      yield suites.make_example(source=name, category="Refer&Ground", metric="iou",
                                question=REFER_PROMPT.format(text.strip()), answers=[answer], images=[image],
                                instruction=instruction, where=f"{where} sentence {k}",
                                example_id=sentence.get("sent_id", f"{ref.get('ref_id')}:{k}"))


def jsonl_examples(path: str, images_dir: str, *, name: str, category: str, metric: str,
                   instruction: str = "") -> Iterator[dict]:
  del images_dir  # JSONL image paths are relative to the file
  yield from suites.read_jsonl(path, source=name, category=category, metric=metric, instruction=instruction)


def _read_lines(path: str) -> list[str]:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().splitlines()
  except OSError as e:
    raise FileNotFoundError(f"{path} cannot be read ({e.strerror})") from e


def mme_examples(path: str, images_dir: str, *, name: str = "MME", instruction: str = "") -> Iterator[dict]:
  """Two questions per image ("Yes" and "No"); records carry subset (the subtask) and group (the image)."""
  del images_dir  # the release folder holds the images
  if not os.path.isdir(path):
    raise ValueError(f"{path}: give the MME release folder (one folder per subtask) as --input")
  subtasks = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
  found = 0
  for subtask in subtasks:
    folder = os.path.join(path, subtask)
    qa_dir = os.path.join(folder, "questions_answers_YN")
    qa_dir = qa_dir if os.path.isdir(qa_dir) else folder
    image_dir = os.path.join(folder, "images")
    image_dir = image_dir if os.path.isdir(image_dir) else folder
    for txt in sorted(f for f in os.listdir(qa_dir) if f.endswith(".txt")):
      stem, file = txt[:-len(".txt")], os.path.join(qa_dir, txt)
      image = _find_image(image_dir, [stem + ext for ext in (".jpg", ".png", ".jpeg")], file)
      for k, line in enumerate(_read_lines(file), 1):
        if not line.strip():
          continue
        parts = line.split("\t")
        if len(parts) != 2 or parts[1].strip().lower() not in YES_NO:
          raise ValueError(f"{file}:{k}: expected 'question<TAB>Yes' or 'question<TAB>No', got {line[:80]!r}")
        found += 1
        yield suites.make_example(source=name, category="General", metric="mme", question=parts[0],
                                  answers=[parts[1].strip()], images=[image], instruction=instruction,
                                  where=f"{file}:{k}", example_id=f"{subtask}/{stem}:{k}", subset=subtask,
                                  group=f"{subtask}/{stem}")
  if not found:
    raise ValueError(f"{path}: no subtask folder with question files (<image>.txt of 'question<TAB>Yes|No' lines)")


def pope_examples(path: str, images_dir: str, *, name: str = "POPE", instruction: str = "") -> Iterator[dict]:
  """POPE's question files (one per split); records carry subset = the split."""
  stem = os.path.splitext(os.path.basename(path))[0]
  file_split = stem.rsplit("_", 1)[-1]
  for k, line in enumerate(_read_lines(path), 1):
    if not line.strip():
      continue
    where = f"{path}:{k}"
    try:
      item = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not JSON ({e.msg}); POPE files hold one JSON object a line") from None
    question = item.get("text", item.get("question")) if isinstance(item, dict) else None
    label = item.get("label", item.get("answer")) if isinstance(item, dict) else None
    if not isinstance(label, str) or label.strip().lower() not in YES_NO:
      raise ValueError(f"{where}: label must be 'yes' or 'no', got {label!r}")
    image = _find_image(images_dir, [_field(item, "image", str, where)], where)
    yield suites.make_example(source=name, category="General", metric="pope", question=question,
                              answers=[label.strip().lower()], images=[image], instruction=instruction, where=where,
                              example_id=item.get("question_id", k), subset=str(item.get("category", file_split)))


def _rows(path: str) -> Iterator[tuple[str, dict]]:
  """(where, row) of a parquet file (Hugging Face layout) or a JSONL file."""
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # only parquet inputs need pyarrow
    try:
      table = pq.ParquetFile(path)
    except (OSError, ValueError) as e:
      raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    row = 0
    for batch in table.iter_batches(batch_size=64):
      for item in batch.to_pylist():
        yield f"{path} row {row}", item
        row += 1
    return
  yield from suites.json_objects(path, _read_lines(path))


def _row_image(cell, images_dir: str, where: str) -> bytes:
  if isinstance(cell, dict):  # Hugging Face Image feature
    if cell.get("bytes"):
      return bytes(cell["bytes"])
    cell = cell.get("path")
  if isinstance(cell, (bytes, bytearray)) and cell:
    return bytes(cell)
  if isinstance(cell, str) and cell:
    return suites.read_image(os.path.join(images_dir, cell), where)
  raise ValueError(f"{where}: an image cell holds neither bytes nor a path ({type(cell).__name__})")


def multi_mc_examples(path: str, images_dir: str, *, name: str = "MuirBench", instruction: str = "",
                      category: str = "Multi-image") -> Iterator[dict]:
  """Multiple choice over several images; records carry subset = the row's task (MuirBench) or sub_task (BLINK)."""
  for where, row in _rows(path):
    if "image_list" in row or "images" in row:
      cells = row.get("image_list", row.get("images"))
    else:
      numbered = sorted((k for k in row if k.startswith("image_") and k[len("image_"):].isdigit()),
                        key=lambda k: int(k[len("image_"):]))
      cells = [row[k] for k in numbered if row[k] is not None]
    if not isinstance(cells, list) or not cells:
      raise ValueError(f"{where}: no images (expected 'image_list', 'images' or 'image_1'..'image_n')")
    choices = row.get("options", row.get("choices"))
    answer = row.get("answer")
    if not isinstance(answer, str):
      raise ValueError(f"{where}: field 'answer' is {type(answer).__name__}, not a letter or a choice")
    answer = answer.strip()
    if len(answer) == 3 and answer[0] == "(" and answer[2] == ")":  # BLINK writes "(A)"
      answer = answer[1]
    subset = row.get("task", row.get("sub_task"))
    extra = {"subset": str(subset)} if subset is not None else {}
    yield suites.make_example(source=name, category=category, metric="mc", question=row.get("question"),
                              answers=[answer], images=[_row_image(c, images_dir, where) for c in cells],
                              choices=choices, instruction=instruction, where=where,
                              example_id=row.get("idx", row.get("id", where)), **extra)


def _video(images_dir: str, reference: str, frames: int, where: str) -> tuple[list[bytes], dict]:
  """(images, video field) of the video `reference` (a path or an id without suffix) under images_dir."""
  stem = os.path.join(images_dir, reference)
  candidates = [stem] + [os.path.join(images_dir, sub, reference) + suffix for sub in ("", "data", "videos")
                         for suffix in VIDEO_SUFFIXES]
  path = next((c for c in candidates if os.path.isfile(c)), None)
  if path is None:
    raise FileNotFoundError(f"{where}: video {stem} not found (also tried {'/'.join(VIDEO_SUFFIXES)} suffixes and "
                            "the data/ and videos/ folders)")
  return video_lib.store_video(suites.read_image(path, where), frames, max_pixels=VIDEO_MAX_PIXELS,
                               where=f"{where} video {path}")


def _option_texts(options, where: str) -> list[str]:
  """Options as texts: Video-MME writes "A. text", strip the letters it already carries."""
  if isinstance(options, str) or not isinstance(options, (list, tuple)) or not options:
    raise ValueError(f"{where}: field 'options' must be a non-empty list, got {options!r:.80}")
  texts = []
  for letter, option in zip("ABCDEFGHIJKLMNOPQRSTUVWXYZ", options):
    option = str(option).strip()
    for prefix in (f"{letter}. ", f"({letter}) ", f"{letter}) "):
      if option.startswith(prefix):
        option = option[len(prefix):].strip()
        break
    texts.append(option)
  return texts


def videomme_examples(path: str, images_dir: str, *, name: str = "Video-MME", instruction: str = "",
                      frames: int = 0) -> Iterator[dict]:
  for where, row in _rows(path):
    video_id = row.get("videoID", row.get("video_id", row.get("video")))
    if not isinstance(video_id, str) or not video_id:
      raise ValueError(f"{where}: no video (expected a 'videoID', 'video_id' or 'video' field)")
    answer = _field(row, "answer", str, where).strip()
    images, video = _video(images_dir, video_id, frames, where)
    extra = {"subset": str(row["duration"])} if row.get("duration") else {}
    if row.get("task_type"):
      extra["task"] = str(row["task_type"])
    yield suites.make_example(source=name, category="Video", metric="mc", question=row.get("question"),
                              answers=[answer], images=images, video=video,
                              choices=_option_texts(row.get("options"), where), instruction=instruction,
                              where=where, example_id=str(row.get("question_id", where)), **extra)


def _list_or_rows(path: str) -> Iterator[tuple[str, dict]]:
  """Rows of a JSON list file (MVBench), else of a parquet or JSONL file (`_rows`)."""
  if path.endswith(".json"):
    content = _load_json(path)
    if not isinstance(content, list):
      raise ValueError(f"{path}: expected a JSON list of questions, got {type(content).__name__}")
    for k, item in enumerate(content):
      if not isinstance(item, dict):
        raise ValueError(f"{path}[{k}]: expected an object, got {type(item).__name__}")
      yield f"{path}[{k}]", item
    return
  yield from _rows(path)


def video_mc_examples(path: str, images_dir: str, *, name: str = "MVBench", instruction: str = "",
                      category: str = "Video", frames: int = 0) -> Iterator[dict]:
  for where, row in _list_or_rows(path):
    reference = _field(row, "video", str, where)
    answer = row.get("answer")
    if not isinstance(answer, str) or not answer.strip():
      raise ValueError(f"{where}: field 'answer' must be an option letter or an option's text, got {answer!r}")
    answer = answer.strip()
    if len(answer) == 3 and answer[0] == "(" and answer[2] == ")":
      answer = answer[1]
    images, video = _video(images_dir, reference, frames, where)
    task = row.get("task", row.get("task_type"))
    yield suites.make_example(source=name, category=category, metric="mc", question=row.get("question"),
                              answers=[answer], images=images, video=video,
                              choices=_option_texts(row.get("options", row.get("candidates")), where),
                              instruction=instruction, where=where, example_id=str(row.get("id", where)),
                              **({"subset": str(task)} if task else {}))


FORMATS: dict[str, Callable[..., Iterator[dict]]] = {
    "textvqa": textvqa_examples, "docvqa": docvqa_examples, "chartqa": chartqa_examples,
    "refcoco": refcoco_examples, "jsonl": jsonl_examples, "mme": mme_examples, "pope": pope_examples,
    "multi_mc": multi_mc_examples, "videomme": videomme_examples, "video_mc": video_mc_examples,
}


def examples(fmt: str, inputs: Sequence[str], *, images_dir: str = "", name: str, max_examples: int = 0,
             instruction: str | None = None, shots: int = 0, support: Sequence[str] = (), seed: int = 0,
             **options) -> Iterator[dict]:
  """Examples of every input file of format `fmt`, in order; at most `max_examples` (0: all).

  `instruction` None: the format's default. `shots` > 0: each query follows `shots` examples of the `support`
  files, drawn without replacement by a generator seeded with (seed, query index).
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown benchmark format {fmt!r}; known: {sorted(FORMATS)}")
  if not inputs:
    raise ValueError(f"format {fmt}: no input file given")
  if instruction is None:
    instruction = default_instruction(fmt, options.get("metric", ""))

  def read(path: str) -> Iterator[dict]:
    root = images_dir or os.path.dirname(paths.absolute(path))
    return FORMATS[fmt](path, root, name=name, instruction=instruction, **options)

  pool = []
  if shots < 0:
    raise ValueError(f"shots must be >= 0, got {shots}")
  if shots:
    if not support:
      raise ValueError(f"{shots} shots need support examples (--support FILE, in the format of the inputs)")
    pool = [example for path in support for example in read(path)]
    if len(pool) < shots:
      raise ValueError(f"{shots} shots, but the support files {list(support)} hold {len(pool)} examples")
  count = 0
  for path in inputs:
    for example in read(path):
      if max_examples and count >= max_examples:
        return
      if shots:
        example = suites.with_support(example, random.Random(f"{seed}:{count}").sample(pool, shots))
      count += 1
      yield example


def import_benchmark(fmt: str, inputs: Sequence[str], *, out_dir: str, name: str, images_dir: str = "",
                     max_examples: int = 0, overwrite: bool = False, **options) -> int:
  """Writes the examples as split "test" of dataset `out_dir/name`; returns how many were written."""
  suites.check_name(name)
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
