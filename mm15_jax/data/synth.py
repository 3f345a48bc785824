"""Builds the synthetic corpus: every dataset of the three stages, held-out splits and a tokenizer.

  mm15 data synth --out DIR [--seed N] [--scale X] [--video] [--ui [--ui-size small|phone]]

Each dataset split draws from its own generator, seeded by (seed, crc32 of "name/split"), so a build is a pure
function of the seed and scale: the same seed gives byte-identical records, and adding a dataset leaves the others
unchanged. The tokenizer is a sentencepiece BPE model trained on the corpus text (byte fallback, single digits).

--video adds the synthetic video QA datasets (synth_video.py, train and held-out test splits) to DIR, building the
image corpus there first when DIR has none. The tokenizer stays the image corpus's (video questions are encoded with
it, byte fallback included), so a checkpoint trained on the image corpus continues on video; the image datasets and
the tokenizer are byte-identical with and without --video.

`--ui` adds the mobile-UI datasets of synth_ui.py (the others, drawn from their own generators, stay the same; the
tokenizer then also sees the UI text).
"""
from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import sentencepiece as spm

from mm15_jax import paths
from mm15_jax.data import records
from mm15_jax.data import tokenizer as tokenizer_lib
from mm15_jax.data import synth_docs, synth_scenes, synth_sft, synth_ui, synth_video

Maker = Callable[[np.random.Generator, str], dict]

# name -> (maker, train records at scale 1, test records at scale 1 or 0).
DATASETS: dict[str, tuple[Maker, int, int]] = {
    "caption": (synth_scenes.make_caption, 3000, 0),
    "interleaved": (synth_scenes.make_interleaved, 300, 0),
    "text": (synth_docs.make_text, 1000, 0),
    "ocr_pdfa": (synth_docs.make_ocr_pdfa, 400, 0),
    "ocr_idl": (synth_docs.make_ocr_idl, 400, 0),
    "ocr_rendered_text": (synth_docs.make_ocr_rendered_text, 400, 0),
    "ocr_docstruct": (synth_docs.make_ocr_docstruct, 400, 0),
    "sft_general": (synth_scenes.make_sft_general, 2000, 200),
    "sft_text_rich": (synth_docs.make_sft_text_rich, 800, 200),
    "sft_refer_ground": (synth_scenes.make_sft_refer_ground, 2000, 200),
    "sft_science": (synth_sft.make_sft_science, 200, 0),
    "sft_math": (synth_sft.make_sft_math, 300, 0),
    "sft_code": (synth_sft.make_sft_code, 200, 0),
    "sft_multi_image": (synth_scenes.make_sft_multi_image, 300, 0),
    "sft_text_only": (synth_sft.make_sft_text_only, 300, 0),
}
TOKENIZER_FILE = "tokenizer.model"
CORPUS_FILE = "corpus.json"
VOCAB_SIZE = 1536


def split_counts(scale: float, datasets: dict[str, tuple[Maker, int, int]] | None = None) -> dict[str, dict[str, int]]:
  """Records per dataset and split at `scale` (at least one record in every split that exists)."""
  if scale <= 0:
    raise ValueError(f"scale must be positive, got {scale}")
  counts = {}
  for name, (_, n_train, n_test) in (DATASETS if datasets is None else datasets).items():
    counts[name] = {"train": max(1, round(n_train * scale))}
    if n_test:
      counts[name]["test"] = max(1, round(n_test * scale))
  return counts


def split_rng(seed: int, name: str, split: str) -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(f"{name}/{split}".encode())])


def generate(name: str, split: str, count: int, seed: int,
             datasets: dict[str, tuple[Maker, int, int]] | None = None) -> Iterator[dict]:
  """The records of one dataset split, in order."""
  maker = ({**DATASETS, **synth_video.DATASETS} if datasets is None else datasets)[name][0]
  rng = split_rng(seed, name, split)
  for _ in range(count):
    yield maker(rng, split)


def record_texts(record: dict) -> list[str]:
  """Text of a record as the tokenizer will see it (image markers removed)."""
  if record["kind"] == "interleaved":
    texts = [s for s in record["segments"] if isinstance(s, str)]
  elif record["kind"] == "sft":
    texts = [m["content"].replace(records.IMAGE_MARKER, "") for m in record["messages"]]
  else:
    texts = [record["text"]]
  return [t.strip() for t in texts if t.strip()]


def train_tokenizer(texts: list[str], model_path: str | os.PathLike, *, vocab_size: int = VOCAB_SIZE) -> None:
  """Trains the corpus tokenizer on `texts`, one sentencepiece sentence per non-empty line."""
  lines = [line for text in texts for line in text.split("\n") if line.strip()]
  tokenizer_lib.train_sentencepiece(lines, str(model_path), vocab_size=vocab_size)


def build_corpus(out_dir: str | os.PathLike, *, seed: int = 0, scale: float = 1.0, ui: bool = False,
                 ui_size: str = "small", progress: Callable[[str], None] | None = print) -> dict:
  """Writes every dataset, out_dir/tokenizer.model and out_dir/corpus.json; returns the corpus.json content.

  `ui`: also the mobile-UI datasets, screens drawn at `ui_size` (synth_ui.SIZES).
  """
  progress = progress or (lambda _: None)
  out = paths.ensure_writable_dir(out_dir)  # a missing bucket or permission stops here
  datasets = {**DATASETS, **synth_ui.datasets(ui_size)} if ui else DATASETS
  counts = split_counts(scale, datasets)
  texts: list[str] = []

  def collect(stream: Iterator[dict]) -> Iterator[dict]:
    for record in stream:
      texts.extend(record_texts(record))
      yield record

  start = time.time()
  for name, split_sizes in counts.items():
    t0 = time.time()
    splits = {split: collect(generate(name, split, n, seed, datasets)) for split, n in split_sizes.items()}
    records.write_source(out, name, splits, description=f"synthetic {name} (seed {seed}, scale {scale})")
    sizes = ", ".join(f"{split} {n}" for split, n in split_sizes.items())
    progress(f"synth: {name:<18} {sizes:<22} {time.time() - t0:5.1f}s")
  t0 = time.time()
  train_tokenizer(texts, out / TOKENIZER_FILE)
  vocab = spm.SentencePieceProcessor(model_proto=(out / TOKENIZER_FILE).read_bytes()).get_piece_size()
  progress(f"synth: tokenizer          vocab {vocab:<16} {time.time() - t0:5.1f}s")
  summary = {"seed": seed, "scale": scale, "datasets": counts, "tokenizer": TOKENIZER_FILE, "vocab_size": vocab}
  if ui:
    summary["ui_size"] = ui_size
  (out / CORPUS_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
  progress(f"synth: wrote {sum(sum(c.values()) for c in counts.values())} records to {out} "
           f"in {time.time() - start:.1f}s")
  return summary


def add_datasets(out_dir: str | os.PathLike, datasets: dict[str, tuple[Maker, int, int]], key: str, *,
                 seed: int = 0, scale: float = 1.0, progress: Callable[[str], None] | None = print,
                 **corpus_fields) -> dict:
  """Writes `datasets` (train and test splits) into out_dir beside its image corpus (built first if out_dir has
  none) and records them under `key` in corpus.json, with `corpus_fields`; returns its content. The image corpus's
  tokenizer stays: a checkpoint trained on it continues on these datasets."""
  progress = progress or (lambda _: None)
  out = paths.ensure_writable_dir(out_dir)
  if not (out / CORPUS_FILE).exists():
    build_corpus(out, seed=seed, scale=scale, progress=progress)
  summary = json.loads((out / CORPUS_FILE).read_text())
  if (summary["seed"], summary["scale"]) != (seed, scale):
    progress(f"synth: note: the image corpus in {out} was built with seed {summary['seed']}, scale "
             f"{summary['scale']}; the {key.removesuffix('_datasets')} datasets use seed {seed}, scale {scale}")
  counts = {name: {split: max(1, round(n * scale)) for split, n in (("train", n_train), ("test", n_test)) if n}
            for name, (_, n_train, n_test) in datasets.items()}
  for name, split_sizes in counts.items():
    t0 = time.time()
    records.write_source(out, name, {split: generate(name, split, n, seed, datasets)
                                     for split, n in split_sizes.items()},
                         description=f"synthetic {name} (seed {seed}, scale {scale})")
    sizes = ", ".join(f"{split} {n}" for split, n in split_sizes.items())
    progress(f"synth: {name:<18} {sizes:<22} {time.time() - t0:5.1f}s")
  summary.update({key: counts, **corpus_fields})
  (out / CORPUS_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
  return summary


def build_video_corpus(out_dir: str | os.PathLike, *, seed: int = 0, scale: float = 1.0,
                       progress: Callable[[str], None] | None = print) -> dict:
  """The video datasets (synth_video.py) added to out_dir's image corpus, under "video_datasets" in corpus.json."""
  return add_datasets(out_dir, synth_video.DATASETS, "video_datasets", seed=seed, scale=scale, progress=progress)


def add_ui_datasets(out_dir: str | os.PathLike, *, seed: int = 0, scale: float = 1.0, ui_size: str = "small",
                    progress: Callable[[str], None] | None = print) -> dict:
  """The UI datasets (synth_ui.py) added to out_dir's image corpus with its tokenizer (`build_corpus(ui=True)`
  instead trains the tokenizer on the UI text too), under "ui_datasets" in corpus.json."""
  return add_datasets(out_dir, synth_ui.datasets(ui_size), "ui_datasets", seed=seed, scale=scale,
                      progress=progress, ui_size=ui_size)


def synth_command(args) -> None:
  """`mm15 data synth --out DIR [--seed N] [--scale X] [--video] [--ui [--ui-size S]]`; args: argparse namespace."""
  if getattr(args, "video", False):
    build_video_corpus(args.out, seed=int(args.seed), scale=float(args.scale))
  else:
    build_corpus(args.out, seed=int(args.seed), scale=float(args.scale), ui=bool(getattr(args, "ui", False)),
                 ui_size=getattr(args, "ui_size", "small"))
