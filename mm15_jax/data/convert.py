"""Converts datasets in the formats they ship in (webdataset tars, parquet, JSONL, LLaVA JSON) into record datasets.

  mm15 data convert --format webdataset|parquet|jsonl|llava|llava-video|rico --kind KIND --input FILES...
                    --out DATA_DIR --name DATASET [options]

Kinds by format (convert_formats.KINDS): webdataset ocr|caption; parquet ocr|caption|text|interleaved|sft (the
last: the_cauldron or LLaVA-OneVision layout); jsonl text|interleaved; llava sft; llava-video sft (video records,
category "video" unless --category); rico sft or a held-out UI task (convert_ui.py).

The result is the same TFDS ArrayRecord layout `records.write_source` writes (DATA_DIR/<name>/<version>/), read
with `records.open_source`. Conversion is restartable and parallel over input shards (a tar or parquet file, or
`--records-per-shard` entries of a LLaVA file):

  * each input shard is converted by one worker into DATA_DIR/<name>/.convert/<split>/<id>.array_record (written
    under a temporary name, then renamed) followed by <id>.json, its manifest: the input's path, size and mtime,
    the conversion options, record and bad-entry counts. A shard whose manifest matches is not converted again,
    so a rerun after an interruption converts only what is missing, and a changed input or option redoes it;
  * when every shard is done, the staged files are hard-linked (copied where links are impossible) into the
    dataset's shard files, in input order, and dataset_info.json is written for this split; other splits of the
    dataset are kept. The staged files may be deleted after a conversion, at the price of a full rerun later.

Bad entries (unreadable image, missing field or image file, image markers that do not match the images) are
skipped, counted per shard with warnings naming the shard and key, and summarised at the end; above
`max_bad_fraction` of all entries the conversion fails and writes no dataset (staged shards stay for a rerun).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from etils import epath

from mm15_jax import paths
from mm15_jax.data import records
from mm15_jax.data.convert_formats import (DEFAULT_COLUMNS, FORMATS, KINDS, READERS, BadEntry, ConvertOptions, Shard,
                                           load_llava_entries)

FILE_SUFFIXES = {"webdataset": (".tar", ".tar.gz", ".tgz"), "parquet": (".parquet",), "llava": (".json", ".jsonl"),
                 "llava-video": (".json", ".jsonl"), "jsonl": (".jsonl", ".json"), "rico": (".json",)}
STAGING = ".convert"
_WARNINGS_PER_SHARD = 10  # bad entries named per shard; the rest are counted


class ConvertError(RuntimeError):
  """A conversion that cannot produce a dataset: bad options or inputs, a failed shard, too many bad entries."""


@dataclasses.dataclass
class ConvertSummary:
  name: str
  split: str
  records: int
  bad: int
  shards: int
  converted: list[str]  # labels of the shards converted by this run
  reused: list[str]  # labels of the shards a previous run had converted
  bad_by_reason: dict[str, int]
  dataset_dir: str


def expand_inputs(patterns: Iterable[str], fmt: str) -> list[str]:
  """Files, globs and folders (every file with the format's suffix) -> existing files, in order, without repeats."""
  files: list[str] = []
  for pattern in patterns:
    if os.path.isdir(pattern):
      found = sorted(os.path.join(pattern, f) for f in os.listdir(pattern) if f.endswith(FILE_SUFFIXES[fmt]))
    elif glob.has_magic(pattern):
      found = sorted(glob.glob(pattern))
    else:
      found = [pattern] if os.path.isfile(pattern) else []
    if not found:
      raise ConvertError(f"--input {pattern!r}: no such file (or no {'/'.join(FILE_SUFFIXES[fmt])} file)")
    files.extend(f for f in found if os.path.isfile(f))
  return list(dict.fromkeys(os.path.abspath(f) for f in files))


def plan_shards(files: list[str], opts: ConvertOptions) -> list[Shard]:
  if opts.format == "rico":
    from mm15_jax.data import convert_ui
    return convert_ui.plan_shards(files, opts)
  if opts.format not in ("llava", "llava-video"):
    return [Shard(path) for path in files]
  shards = []
  for path in files:
    try:
      entries = load_llava_entries(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
      raise ConvertError(f"--input {path}: {e}") from e
    for start in range(0, len(entries), opts.records_per_shard):
      stop = min(start + opts.records_per_shard, len(entries))
      shards.append(Shard(path, start, stop, entries[start:stop]))
  return shards


def _input_fingerprint(shard: Shard) -> dict:
  stat = os.stat(shard.path)
  out = {"path": shard.path, "start": shard.start, "stop": shard.stop, "size": stat.st_size,
         "mtime_ns": stat.st_mtime_ns}
  if shard.entries is not None and all(isinstance(e, str) for e in shard.entries):  # a shard of files (rico)
    digest = hashlib.sha1()
    for path in shard.entries:
      entry = os.stat(path)
      digest.update(f"{path}:{entry.st_size}:{entry.st_mtime_ns}\n".encode())
    out["files"] = digest.hexdigest()
  return out


def _shard_id(shard: Shard) -> str:
  return hashlib.sha1(f"{shard.path}:{shard.start}:{shard.stop}".encode()).hexdigest()[:16]


def _write_json(path: str, payload: dict) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1, ensure_ascii=False)
  os.replace(path + ".tmp", path)


def _done_manifest(stage_dir: str, shard: Shard, opts: ConvertOptions) -> dict | None:
  """The manifest of a finished conversion of `shard` with these options, or None."""
  sid = _shard_id(shard)
  try:
    with open(os.path.join(stage_dir, sid + ".json"), encoding="utf-8") as f:
      manifest = json.load(f)
    size = os.path.getsize(os.path.join(stage_dir, sid + ".array_record"))
  except (OSError, json.JSONDecodeError):
    return None
  if (manifest.get("input") != _input_fingerprint(shard) or manifest.get("options") != opts.fingerprint()
      or manifest.get("file_size") != size):
    return None
  return manifest


_SERIALIZER = None


def _serialize(example: dict) -> bytes:
  """On-disk example -> the bytes TFDS stores in ArrayRecord files for the records' features."""
  global _SERIALIZER
  if _SERIALIZER is None:
    from tensorflow_datasets.core import example_serializer
    _SERIALIZER = example_serializer.ExampleSerializer(records._FEATURES.get_serialized_info())
  return _SERIALIZER.serialize_example(records._FEATURES.encode_example(example))


def convert_shard(shard: Shard, opts: ConvertOptions, stage_dir: str) -> dict:
  """Converts one shard into stage_dir/<id>.array_record and writes its manifest; returns the manifest."""
  from array_record.python import array_record_module
  start = time.time()
  sid = _shard_id(shard)
  data_path, manifest_path = os.path.join(stage_dir, sid + ".array_record"), os.path.join(stage_dir, sid + ".json")
  if os.path.exists(manifest_path):
    os.remove(manifest_path)  # the manifest must never describe a data file from another run
  n_records, num_bytes, bad = 0, 0, []
  writer = array_record_module.ArrayRecordWriter(data_path + ".tmp", "group_size:1")
  try:
    for key, item in READERS[opts.format](shard, opts):
      if isinstance(item, BadEntry):
        bad.append((key, item))
        continue
      example = records.encode_record(item)
      try:
        records.decode_record(example, where=f"{shard.label}:{key}")
      except ValueError as e:
        bad.append((key, BadEntry("invalid record", str(e))))
        continue
      payload = _serialize(example)
      writer.write(payload)
      n_records += 1
      num_bytes += len(payload)
  finally:
    writer.close()
  os.replace(data_path + ".tmp", data_path)
  manifest = {"id": sid, "label": shard.label, "input": _input_fingerprint(shard), "options": opts.fingerprint(),
              "records": n_records, "num_bytes": num_bytes, "file_size": os.path.getsize(data_path),
              "bad": len(bad), "bad_by_reason": dict(Counter(e.reason for _, e in bad)),
              "bad_examples": [[key, str(e)] for key, e in bad[:_WARNINGS_PER_SHARD]],
              "seconds": round(time.time() - start, 3)}
  _write_json(manifest_path, manifest)
  return manifest


def _convert_task(task: tuple[int, Shard, ConvertOptions, str]) -> tuple[int, dict | None, str]:
  """Worker entry point: (index, manifest, "") or (index, None, error message)."""
  index, shard, opts, stage_dir = task
  try:
    return index, convert_shard(shard, opts, stage_dir), ""
  except Exception as e:  # a shard-wide failure: reported by the parent, which stops the conversion
    return index, None, f"{type(e).__name__}: {e}"


def _run(tasks: list, workers: int) -> Iterator[tuple[int, dict | None, str]]:
  if workers <= 1 or len(tasks) <= 1:
    yield from map(_convert_task, tasks)
    return
  # spawn: the parent may hold threads (JAX, TFDS) that a fork would copy in an undefined state.
  with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
    yield from pool.imap_unordered(_convert_task, tasks)


def _link_or_copy(source: str, target: str) -> None:
  if paths.is_local(target):
    try:
      os.link(source, target)
      return
    except OSError:
      pass
  epath.Path(source).copy(epath.Path(target), overwrite=True)


def staging_dir(data_dir: str, name: str, split: str) -> str:
  """Where the converted shards wait: beside the dataset, or (ArrayRecord writes local files only) a local folder
  of this machine's temporary directory for a dataset on an object store; a rerun continues from either."""
  if paths.is_local(data_dir):
    return os.path.join(data_dir, name, STAGING, split)
  key = hashlib.sha1(paths.join(data_dir, name, split).encode()).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), "mm15-convert", f"{name}-{split}-{key}")


def finalize(data_dir: str, name: str, split: str, stage_dir: str, manifests: list[dict]) -> str:
  """Makes the staged shards (in order) split `split` of dataset `name`, keeping its other splits."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import dataset_info, file_adapters, naming
  from tensorflow_datasets.core import splits as split_lib
  version_dir = epath.Path(data_dir) / name / records.VERSION
  version_dir.mkdir(parents=True, exist_ok=True)
  kept = []
  if (version_dir / "dataset_info.json").exists():
    old = tfds.builder_from_directory(str(version_dir)).info
    kept = [info for split_name, info in old.splits.items() if split_name != split]
  for old_file in version_dir.glob(f"{name}-{split}.array_record-*"):
    old_file.unlink()
  filled = [m for m in manifests if m["records"]]  # a shard of only bad entries adds no file
  template = naming.ShardedFileTemplate(data_dir=version_dir, dataset_name=name, split=split,
                                        filetype_suffix=file_adapters.FileFormat.ARRAY_RECORD.file_suffix)
  for manifest, target in zip(filled, template.sharded_filepaths(len(filled))):
    _link_or_copy(os.path.join(stage_dir, manifest["id"] + ".array_record"), os.fspath(target))
  split_info = split_lib.SplitInfo(name=split, shard_lengths=[m["records"] for m in filled],
                                   num_bytes=sum(m["num_bytes"] for m in filled), filename_template=template)
  identity = dataset_info.DatasetIdentity(name=name, version=tfds.core.Version(records.VERSION),
                                          data_dir=os.fspath(version_dir), module_name=records.__name__)
  info = dataset_info.DatasetInfo(builder=identity, features=records._FEATURES, description=name,
                                  disable_shuffling=True)
  info.set_file_format(file_adapters.FileFormat.ARRAY_RECORD)
  info.set_splits(split_lib.SplitDict([*kept, split_info]))
  info.write_to_directory(version_dir)
  return os.fspath(version_dir)


def convert(inputs: Iterable[str], data_dir: str, name: str, opts: ConvertOptions, *, split: str = "train",
            workers: int = 1, max_bad_fraction: float = 0.01,
            progress: Callable[[str], None] | None = print) -> ConvertSummary:
  """Converts `inputs` (files, globs, folders) into split `split` of dataset `name` under `data_dir`."""
  log = progress or (lambda _: None)
  if opts.format not in FORMATS:
    raise ConvertError(f"--format {opts.format!r}: expected one of {FORMATS}")
  if opts.kind not in KINDS[opts.format]:
    raise ConvertError(f"--kind {opts.kind!r}: --format {opts.format} makes one of {KINDS[opts.format]}")
  if opts.kind == "sft" and not opts.category and opts.format != "rico":  # rico records are category "ui"
    raise ConvertError(f"--category is required for --format {opts.format} --kind sft (the SFT category of the "
                       "records)")
  if opts.format == "rico" and opts.records_per_shard < 1:
    raise ConvertError(f"--records-per-shard {opts.records_per_shard}: must be at least 1")
  if opts.format in ("llava", "llava-video"):
    if not os.path.isdir(opts.image_root):
      raise ConvertError(f"--image-root {opts.image_root!r} is not a folder (required for --format {opts.format})")
    if opts.records_per_shard < 1:
      raise ConvertError(f"--records-per-shard {opts.records_per_shard}: must be at least 1")
  elif opts.image_root and not os.path.isdir(opts.image_root):
    raise ConvertError(f"--image-root {opts.image_root!r} is not a folder")
  if not 0.0 <= max_bad_fraction <= 1.0:
    raise ConvertError(f"--max-bad-fraction {max_bad_fraction}: must be in [0, 1]")
  if not name or "/" in name or name.startswith("."):
    raise ConvertError(f"--name {name!r}: not a dataset name")
  where = f"{name}/{split}"
  shards = plan_shards(expand_inputs(inputs, opts.format), opts)
  paths.ensure_writable_dir(data_dir)  # a missing bucket or permission stops here, before any conversion
  stage_dir = staging_dir(data_dir, name, split)
  os.makedirs(stage_dir, exist_ok=True)

  manifests: list[dict | None] = [_done_manifest(stage_dir, s, opts) for s in shards]
  reused = [s.label for s, m in zip(shards, manifests) if m is not None]
  tasks = [(i, s, opts, stage_dir) for i, (s, m) in enumerate(zip(shards, manifests)) if m is None]
  log(f"convert {where}: {len(shards)} shards ({len(reused)} already converted in {stage_dir}), "
      f"{len(tasks)} to convert (workers: {max(1, min(workers, len(tasks)))})")
  start, new_records = time.time(), 0
  results = _run(tasks, workers)
  for index, manifest, error in results:
    if manifest is None:
      results.close()  # stops the workers still converting
      raise ConvertError(f"convert {where}: shard {shards[index].label} failed: {error} "
                         f"(finished shards are kept in {stage_dir}; a rerun continues from there)")
    manifests[index] = manifest
    new_records += manifest["records"]
    for key, message in manifest["bad_examples"]:
      log(f"WARNING {where}: shard {manifest['label']}: skipped {key!r}: {message}")
    if manifest["bad"] > len(manifest["bad_examples"]):
      log(f"WARNING {where}: shard {manifest['label']}: "
          f"{manifest['bad'] - len(manifest['bad_examples'])} more bad entries skipped")
    done = [m for m in manifests if m is not None]
    log(f"convert {where}: shards {len(done)}/{len(shards)}, records {sum(m['records'] for m in done)}, "
        f"bad {sum(m['bad'] for m in done)}, {new_records / max(time.time() - start, 1e-6):.0f} records/s")

  n_records, n_bad = sum(m["records"] for m in manifests), sum(m["bad"] for m in manifests)
  by_reason = Counter()
  for m in manifests:
    by_reason.update(m["bad_by_reason"])
  reasons = ", ".join(f"{reason} {n}" for reason, n in by_reason.most_common())
  worst = sorted((m for m in manifests if m["bad"]), key=lambda m: -m["bad"])[:5]
  if n_records + n_bad == 0:
    raise ConvertError(f"convert {where}: the inputs hold no entries")
  fraction = n_bad / (n_records + n_bad)
  if fraction > max_bad_fraction:
    raise ConvertError(
        f"convert {where}: {n_bad} of {n_records + n_bad} entries are bad ({fraction:.2%} > --max-bad-fraction "
        f"{max_bad_fraction}): {reasons}; most in " + ", ".join(f"{m['label']} ({m['bad']})" for m in worst)
        + f". The dataset was not written (an existing one is unchanged); converted shards are kept in "
        f"{stage_dir} for a rerun.")
  if n_records == 0:
    raise ConvertError(f"convert {where}: no good records")
  dataset_dir = finalize(data_dir, name, split, stage_dir, manifests)
  log(f"convert {where}: wrote {n_records} records from {len(shards)} shards to {dataset_dir}; "
      f"skipped {n_bad} bad entries ({fraction:.2%})" + (f": {reasons}" if n_bad else ""))
  return ConvertSummary(name=name, split=split, records=n_records, bad=n_bad, shards=len(shards),
                        converted=[shards[task[0]].label for task in tasks], reused=reused,
                        bad_by_reason=dict(by_reason), dataset_dir=dataset_dir)


def convert_command(args) -> ConvertSummary:
  """`mm15 data convert`; args: the argparse namespace of the subcommand."""
  kind = args.kind or ("sft" if args.format in ("llava", "llava-video", "rico") else "")
  category = args.category or ("video" if args.format == "llava-video" else "")
  image_column, text_column = DEFAULT_COLUMNS.get(kind, ("image", "text"))
  opts = ConvertOptions(format=args.format, kind=kind, source=args.source or args.name, category=category,
                        text_field=args.text_field, image_column=args.image_column or image_column,
                        text_column=args.text_column or text_column, image_root=args.image_root,
                        records_per_shard=args.records_per_shard,
                        video_frames=getattr(args, "video_frames", 0))
  try:
    return convert(args.input, args.out, args.name, opts, split=args.split, workers=args.workers,
                   max_bad_fraction=args.max_bad_fraction)
  except ConvertError as e:
    raise SystemExit(f"mm15 data convert: {e}") from e
