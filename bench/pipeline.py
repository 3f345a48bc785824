"""Input-pipeline throughput against image decoding, and packing efficiency, on the synthetic corpus.

    python bench/pipeline.py [--data-dir DIR] [--quick] [--tile-size 672] [--image-scale 1] [--out FILE]
                             [--enlarge-on-host] [--compare-images OLD_IMAGES_PY]

The pipeline runs with configs/mm15.py's split settings: enlargements left to the model (data.split.enlarge_on_device:
the batch holds their source pixels), unless --enlarge-on-host, where the host writes every finished tile.

Throughput: the real pipeline (make_pipeline with num_workers=0 and read_threads=0: one thread of one process)
on stage-2 samples (static split: 4 tiles + overview) and stage-3 samples (SFT mixture, dynamic split 4..9 +
overview) of configs/mm15.py at 672 px tiles, against PIL decoding (Image.open + load, nothing else) of exactly the
encoded images of the samples the pipeline drew. Each round runs pipeline batches, then decodes those images (PIL
decode-only, then decode_image: the pipeline's decoder, into numpy; the faster of the two is the floor), then
decodes and splits them (decode_image + split_images: the pipeline's image work alone). A round's samples are those
it drew from the mixture (the first round also fills the packer's pending window). Rates are per CPU second of
this process (time.process_time: single-threaded, so per core) and the ratios are medians over rounds, so other
load on the machine moves wall-clock rates far more than the ratios. Wall-clock rates are printed too.

Images: the throughput is measured twice on the same records. "realistic": every image of a record re-encoded at
the size of real data before the pipeline reads it (REALISTIC: OCR pages at the pixel count of a 200 dpi letter
scan, SFT images at one of four photo sizes, JPEG quality 90, see `reencode`); the re-encoding happens on first
access and its CPU time is measured around it and subtracted, the record itself is still read by the pipeline.
"synthetic": the corpus as generated (PNGs of 50-500 px, upscaled onto the tile canvases: a worst case for resizing
against decoding). --compare-images FILE also runs, in the same rounds and on the same samples, a second pipeline
whose sample builder uses the images module loaded from FILE (e.g. an earlier version from `git show
REV:mm15_jax/data/images.py`, from eba8bb7 on: one whose SplitImage has write_tiles); the two run in alternating
order, and its ratio to decode-only and its CPU time over ours are medians over pairs of rounds of the pair's
geometric mean (see `throughput`).

Packing: share of non-pad token slots (segment_ids != 0, counted in the batches) of the stage-3 SFT mixture at the
per-row limits of configs/mm15.py (seq_len 4096, its max_images; fewer batch rows than the paper's 256) and of
configs/tiny.py (seq_len 512, max_images 20, batch 8), each also at max_images = seq_len // tokens_per_tile, where a
row's image slots can no longer fill before its tokens.

Without --data-dir the corpus is generated into a temporary directory (`mm15 data synth`, ~30 s; kept, named in
the JSON line); with a --data-dir that holds no corpus.json it is generated there.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from mm15_jax import machine
from mm15_jax.config import DataConfig
from mm15_jax.configs import mm15, tiny
from mm15_jax.data import images as images_lib
from mm15_jax.data import pipeline, samples as samples_lib, synth
from mm15_jax.data.tokenizer import Tokenizer

SIZES = {  # rows per batch, rounds, batches per round (throughput: realistic, synthetic images); batches (packing)
    "quick": dict(rows=4, rounds=3, batches_per_round=1, realistic_rounds=3, realistic_batches_per_round=1,
                  packing_batches=4),
    "full": dict(rows=8, rounds=7, batches_per_round=3, realistic_rounds=6, realistic_batches_per_round=1,
                 packing_batches=30),
}
# Realistic images, by source prefix: (width, height) sizes drawn with equal probability per image (the image keeps
# the synthetic image's aspect ratio at the drawn size's pixel count) and the sigma of the Gaussian grain added
# before JPEG encoding. Without grain the upscaled synthetic images compress to 0.2-0.6 bits per pixel and decode
# faster than real scans (~1 bit/pixel) and photos (2-4); the bits per pixel reached are reported.
REALISTIC = {
    "ocr_": dict(sizes=[(1700, 2200)], grain=4.0),  # letter pages scanned at 200 dpi
    "sft_": dict(sizes=[(640, 480), (1024, 768), (1280, 960), (2048, 1536)], grain=10.0),  # photos, screenshots
}
JPEG_QUALITY = 90  # Pillow's default 4:2:0 chroma subsampling


def ensure_corpus(data_dir: str | None, scale: float) -> str:
  if data_dir is None:
    data_dir = tempfile.mkdtemp(prefix="mm15_bench_corpus_")
  if not os.path.exists(os.path.join(data_dir, synth.CORPUS_FILE)):
    synth.build_corpus(data_dir, seed=0, scale=scale, progress=None)
  return data_dir


def realistic_size(w: int, h: int, size: tuple[int, int], scale: float) -> tuple[int, int]:
  """(w, h) with the aspect ratio of a w x h image and the pixel count of `size` scaled by scale**2."""
  pixels = size[0] * size[1] * scale ** 2
  return max(1, round(math.sqrt(pixels * w / h))), max(1, round(math.sqrt(pixels * h / w)))


def reencode(raw: bytes, name: str, index: int, k: int, scale: float) -> bytes:
  """Image k of record name[index], upscaled (bicubic) to a size drawn from REALISTIC, with grain, as JPEG."""
  profile = next((v for prefix, v in REALISTIC.items() if name.startswith(prefix)), None)
  if profile is None:
    raise ValueError(f"{name}: no realistic image size for this source (REALISTIC covers {sorted(REALISTIC)})")
  draw = zlib.crc32(f"{name}/{index}/{k}".encode())
  sizes = profile["sizes"]
  with Image.open(io.BytesIO(raw)) as im:
    w, h = realistic_size(*im.size, sizes[draw % len(sizes)], scale)
    pixels = np.asarray(im.convert("RGB").resize((w, h), Image.Resampling.BICUBIC), np.float32)
  grain = np.random.default_rng(draw).standard_normal(pixels.shape, np.float32) * profile["grain"]
  buf = io.BytesIO()
  Image.fromarray(np.clip(pixels + grain + 0.5, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=JPEG_QUALITY)
  return buf.getvalue()


class RealisticImages:
  """Sources whose records carry re-encoded images (see `reencode`), computed on first access and cached until
  `clear()`; `cpu` / `wall` accumulate the seconds spent re-encoding, for timed code to subtract."""

  def __init__(self, sources: dict[str, Sequence[dict]], scale: float):
    self.scale, self.cache, self.cpu, self.wall = scale, {}, 0.0, 0.0
    self.bits_per_pixel, self.megapixels = [], []
    self.sources = {name: _RealisticSource(self, name, src) for name, src in sources.items()}

  def images(self, name: str, index: int, raw_images: list) -> list[bytes]:
    key = (name, index)
    if key not in self.cache:
      c, w = time.process_time(), time.perf_counter()
      images = [reencode(bytes(b), name, index, k, self.scale) for k, b in enumerate(raw_images)]
      for b in images:
        with Image.open(io.BytesIO(b)) as im:
          self.bits_per_pixel.append(8 * len(b) / (im.width * im.height))
          self.megapixels.append(im.width * im.height / 1e6)
      self.cache[key] = images
      self.cpu += time.process_time() - c
      self.wall += time.perf_counter() - w
    return self.cache[key]

  def clear(self) -> None:
    self.cache.clear()

  def stats(self) -> dict:
    """Images re-encoded since the last call: count, median bits per pixel and megapixels, seconds."""
    out = {"images": len(self.megapixels), "reencode_cpu_s": round(self.cpu, 2)}
    if self.megapixels:
      out.update(median_bits_per_pixel=statistics.median(self.bits_per_pixel),
                 median_megapixels=statistics.median(self.megapixels),
                 max_megapixels=max(self.megapixels))
    self.bits_per_pixel, self.megapixels, self.cpu, self.wall = [], [], 0.0, 0.0
    return out


class _RealisticSource(Sequence):
  """A source read as usual (the pipeline still reads and decodes every record) with its images replaced."""

  def __init__(self, owner: RealisticImages, name: str, records: Sequence[dict]):
    self.owner, self.name, self.records = owner, name, records

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    record = self.records[index]
    return dict(record, images=self.owner.images(self.name, int(index), record.get("images", [])))


def load_images_module(path: str, enlarge_on_device: bool = True):
  """The images module at `path`, registered as `baseline_images` (its functions replace ours in samples.py)."""
  spec = importlib.util.spec_from_file_location("baseline_images", path)
  if spec is None:
    raise ValueError(f"--compare-images {path}: not a Python file")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  if not hasattr(getattr(module, "SplitImage", None), "write_tiles"):
    raise ValueError(f"--compare-images {path}: its SplitImage has no write_tiles (the sample builder's interface "
                     f"since commit eba8bb7); compare an older module by running the bench at its own commit")
  if enlarge_on_device and not hasattr(module.SplitImage, "write_sources"):
    raise ValueError(f"--compare-images {path}: its SplitImage has no write_sources (tiles enlarged by the model, "
                     f"data.split.enlarge_on_device); compare it with --enlarge-on-host")
  return module


@contextlib.contextmanager
def images_module(module):
  """Sample building (samples.py) with `module` in place of mm15_jax.data.images."""
  saved, samples_lib.images_lib = samples_lib.images_lib, module
  try:
    yield
  finally:
    samples_lib.images_lib = saved


@dataclasses.dataclass
class Setting:
  name: str
  data: DataConfig
  tile_size: int
  tokens_per_tile: int
  rows: int


def stage_setting(name: str, exp, stage: int, rows: int, tile_size: int | None = None,
                  enlarge_on_device: bool | None = None, **data_changes) -> Setting:
  st = exp.stages[stage]
  tile = tile_size or st.image_size
  split = st.data.split
  if enlarge_on_device is not None:
    split = dataclasses.replace(split, enlarge_on_device=enlarge_on_device)
  data = dataclasses.replace(st.data, num_workers=0, split=split, **data_changes)
  return Setting(name, data, tile, exp.model.tokens_per_tile, rows)


def open_pipeline(s: Setting, tok: Tokenizer, sources):
  return pipeline.make_pipeline(s.data, sources=sources, tokenizer=tok, tokens_per_tile=s.tokens_per_tile,
                                tile_size=s.tile_size, batch_size=s.rows, read_threads=0)


class BatchCounter:
  """Token and image slots of every batch an iterator gave, counted in the batches themselves."""

  def __init__(self):
    self.batches = self.real_tokens = self.token_slots = self.real_images = self.image_slots = 0

  def add(self, batch) -> None:
    self.batches += 1
    self.real_tokens += int((batch.segment_ids != 0).sum())
    self.token_slots += batch.segment_ids.size
    self.real_images += int(batch.image_mask.sum())
    self.image_slots += batch.image_mask.size


def drawn_images(it, sources, first_unit: int, end_unit: int) -> tuple[int, list[bytes], list[list[bytes]]]:
  """(samples, all encoded images, encoded images of each sample) of units first_unit .. end_unit - 1."""
  n_samples, raw, per_sample = 0, [], []
  for u in range(first_unit, end_unit):
    for name, index in it.unit_records(u):
      images = [bytes(b) for b in sources[name][index].get("images", [])]
      n_samples += 1
      raw += images
      per_sample.append(images)
  return n_samples, raw, per_sample


def decode_only(raw: list[bytes]) -> None:
  for b in raw:
    with Image.open(io.BytesIO(b)) as im:
      im.load()


def decode_to_numpy(raw: list[bytes], max_pixels: int) -> None:
  for b in raw:
    images_lib.decode_image(b, max_pixels=max_pixels)


def decode_and_split(per_sample: list[list[bytes]], s: Setting) -> None:
  """The pipeline's image work alone: decode, split, and write the tiles (or, with data.split.enlarge_on_device,
  their source pixels and extents) into new arrays, as the pipeline writes them into a batch."""
  for images in per_sample:
    decoded = [images_lib.decode_image(b, max_pixels=s.data.max_image_pixels) for b in images]
    for split in images_lib.split_images(decoded, s.data.split, tile_size=s.tile_size):
      out = np.zeros((split.n_tiles, s.tile_size, s.tile_size, 3), np.uint8)
      if s.data.split.enlarge_on_device:
        split.write_sources(out, np.zeros((split.n_tiles, 4), np.int32))
      else:
        split.write_tiles(out)


def timed(fn, *args, exclude: RealisticImages | None = None) -> tuple[float, float]:
  """(CPU seconds of this process, wall seconds) of fn(*args), less the re-encoding time `exclude` counted."""
  c0, w0 = (exclude.cpu, exclude.wall) if exclude else (0.0, 0.0)
  c, w = time.process_time(), time.perf_counter()
  fn(*args)
  c, w = time.process_time() - c, time.perf_counter() - w
  c1, w1 = (exclude.cpu, exclude.wall) if exclude else (0.0, 0.0)
  return c - (c1 - c0), w - (w1 - w0)


def throughput(s: Setting, tok: Tokenizer, sources, rounds: int, batches_per_round: int, image_source: str,
               realistic: RealisticImages | None = None, baseline=None) -> dict:
  """Interleaved rounds of pipeline batches and decode-only / decode+split of the same images; with `baseline` (an
  images module) also pipeline batches built with it, on the same samples, before or after ours in turn."""
  pipes = {"pipeline": (open_pipeline(s, tok, sources), images_lib)}
  if baseline is not None:
    if rounds < 2:
      raise ValueError(f"{s.name}: comparing images modules needs at least 2 rounds (one of each order)")
    pipes["baseline"] = (open_pipeline(s, tok, sources), baseline)
  it = pipes["pipeline"][0]
  counter = BatchCounter()
  per_round = []
  for n_round in range(rounds):
    first_unit, (bad0, seen0) = it.units_drawn, it.bad_records
    round_stats, batches = {}, {}
    for key in (list(pipes) if n_round % 2 == 0 else list(pipes)[::-1]):
      iterator, module = pipes[key]

      def run_batches():
        # Only the small arrays are kept (the tiles are freed at once).
        batches[key] = [dataclasses.replace(b, images=None, image_extent=None)
                        for b in (next(iterator) for _ in range(batches_per_round))]

      with images_module(module):
        cpu, wall = timed(run_batches, exclude=realistic)
      round_stats.update({"cpu" if key == "pipeline" else "baseline_cpu": cpu,
                          "wall" if key == "pipeline" else "baseline_wall": wall})
    for batch in batches["pipeline"]:
      counter.add(batch)
    if baseline is not None and not all(
        np.array_equal(a.tokens, b.tokens) and np.array_equal(a.image_mask, b.image_mask)
        for a, b in zip(batches["pipeline"], batches["baseline"])):
      raise RuntimeError(f"{s.name}: the baseline images module changed the samples' tokens or tile counts")
    bad1, seen1 = it.bad_records
    n_samples, raw, per_sample = drawn_images(it, sources, first_unit, it.units_drawn)
    if bad1 != bad0 or n_samples != seen1 - seen0:
      raise RuntimeError(f"{s.name}: bad records in the corpus; the decode-only reference would not match")
    dec_cpu, dec_wall = timed(decode_only, raw)
    numpy_cpu, _ = timed(decode_to_numpy, raw, s.data.max_image_pixels)
    split_cpu, _ = timed(decode_and_split, per_sample, s)
    per_round.append(dict(samples=n_samples, images=len(raw), **round_stats, decode_cpu=dec_cpu,
                          decode_wall=dec_wall, decode_numpy_cpu=numpy_cpu, split_cpu=split_cpu))
    if realistic is not None:
      realistic.clear()
  sum_of = lambda k: sum(r[k] for r in per_round)
  median_of = lambda f: statistics.median(f(r) for r in per_round)
  result = {
      "setting": s.name, "image_source": image_source, "tile_size": s.tile_size, "rows": s.rows,
      "enlarge_on_device": s.data.split.enlarge_on_device,
      "seq_len": s.data.seq_len, "max_images": s.data.max_images, "rounds": rounds, "samples": sum_of("samples"),
      "images": sum_of("images"),
      "pipeline_samples_per_cpu_s": median_of(lambda r: r["samples"] / r["cpu"]),
      "pipeline_samples_per_wall_s": sum_of("samples") / sum_of("wall"),
      "decode_samples_per_cpu_s": median_of(lambda r: r["samples"] / r["decode_cpu"]),
      "decode_images_per_cpu_s": median_of(lambda r: r["images"] / r["decode_cpu"]),
      "decode_samples_per_wall_s": sum_of("samples") / sum_of("decode_wall"),
      "decode_numpy_samples_per_cpu_s": median_of(lambda r: r["samples"] / r["decode_numpy_cpu"]),
      "decode_split_samples_per_cpu_s": median_of(lambda r: r["samples"] / r["split_cpu"]),
      # Per round, both measured on the same samples: the median of ratios, not a ratio of medians.
      "ratio_pipeline_to_decode": median_of(lambda r: r["decode_cpu"] / r["cpu"]),
      "ratio_pipeline_to_fastest_decode": median_of(lambda r: min(r["decode_cpu"], r["decode_numpy_cpu"]) / r["cpu"]),
      "ratio_pipeline_to_decode_split": median_of(lambda r: r["split_cpu"] / r["cpu"]),
  }
  if baseline is not None:
    # Whichever pipeline runs second in a round is systematically faster or slower (allocator state; +-25% with
    # the same module on both): each pair of rounds, one of each order, is combined by a geometric mean, and the
    # comparison reports the median over pairs.
    pairs = [per_round[i:i + 2] for i in range(0, len(per_round) - 1, 2)]
    paired = lambda f: statistics.median(math.sqrt(f(a) * f(b)) for a, b in pairs)
    result.update(paired_ratio_pipeline_to_decode=paired(lambda r: r["decode_cpu"] / r["cpu"]),
                  baseline_ratio_pipeline_to_decode=paired(lambda r: r["decode_cpu"] / r["baseline_cpu"]),
                  speedup_over_baseline=paired(lambda r: r["baseline_cpu"] / r["cpu"]))
  if realistic is not None:
    result["realistic"] = realistic.stats()
  result.update(packing=packing_result(s, counter, it.packing_stats), per_round=per_round)
  for iterator, _ in pipes.values():
    iterator.close()
  return result


def packing_result(s: Setting, counter: BatchCounter, stats: dict) -> dict:
  return {"setting": s.name, "seq_len": s.data.seq_len, "max_images": s.data.max_images, "rows": s.rows,
          "tokens_per_tile": s.tokens_per_tile, "batches": counter.batches,
          "efficiency": counter.real_tokens / counter.token_slots,
          "image_slot_efficiency": counter.real_images / counter.image_slots,
          "reported_efficiency": stats["token_efficiency"], "image_bound_rows": stats["image_bound_rows"]}


def packing(s: Setting, tok: Tokenizer, sources, n_batches: int) -> dict:
  it = open_pipeline(s, tok, sources)
  counter = BatchCounter()
  for _ in range(n_batches):
    counter.add(next(it))
  stats = it.packing_stats
  it.close()
  return packing_result(s, counter, stats)


def tables(result: dict) -> str:
  lines = ["| images | samples (tile px) | pipeline samples/s | decode-only samples/s (images/s) | "
           "pipeline / decode-only | decode to numpy samples/s | pipeline / faster decode | decode+split samples/s | "
           "pipeline / decode+split | pipeline wall samples/s |",
           "|" + "---|" * 10]
  for t in result["throughput"]:
    lines.append(
        f"| {t['image_source']} | {t['setting']} ({t['tile_size']}) | {t['pipeline_samples_per_cpu_s']:.1f} | "
        f"{t['decode_samples_per_cpu_s']:.1f} ({t['decode_images_per_cpu_s']:.1f}) | "
        f"{t['ratio_pipeline_to_decode']:.3f} | {t['decode_numpy_samples_per_cpu_s']:.1f} | "
        f"{t['ratio_pipeline_to_fastest_decode']:.3f} | {t['decode_split_samples_per_cpu_s']:.1f} | "
        f"{t['ratio_pipeline_to_decode_split']:.2f} | {t['pipeline_samples_per_wall_s']:.1f} |")
  if "speedup_over_baseline" in result["throughput"][0]:
    lines += ["", f"| images | samples | baseline ({result['compare_images']}) / decode-only | "
                  "pipeline / decode-only | baseline CPU s / pipeline CPU s |", "|" + "---|" * 5]
    for t in result["throughput"]:
      lines.append(f"| {t['image_source']} | {t['setting']} | {t['baseline_ratio_pipeline_to_decode']:.3f} | "
                   f"{t['paired_ratio_pipeline_to_decode']:.3f} | {t['speedup_over_baseline']:.2f} |")
  lines += ["", "| realistic images | re-encoded | median bits/pixel | median megapixels | max megapixels |",
            "|" + "---|" * 5]
  for t in result["throughput"]:
    r = t.get("realistic")
    if r and r["images"]:
      lines.append(f"| {t['setting']} | {r['images']} | {r['median_bits_per_pixel']:.2f} | "
                   f"{r['median_megapixels']:.2f} | {r['max_megapixels']:.2f} |")
  lines += ["", "| packing (synthetic images) | seq_len | max_images | rows x batches | token efficiency | "
                "image-slot efficiency | image-bound rows |", "|" + "---|" * 7]
  for p in result["packing"]:
    lines.append(f"| {p['setting']} | {p['seq_len']} | {p['max_images']} | {p['rows']} x {p['batches']} | "
                 f"{p['efficiency']:.3f} | {p['image_slot_efficiency']:.3f} | {100 * p['image_bound_rows']:.0f}% |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data-dir", default=None, help="synthetic corpus (generated when it holds no corpus.json)")
  p.add_argument("--quick", action="store_true", help="few small batches (a smoke test, not a measurement)")
  p.add_argument("--tile-size", type=int, default=672,
                 help="tile size of every configs/mm15.py setting (the tile count of a dynamic split depends on it)")
  p.add_argument("--scale", type=float, default=1.0, help="corpus scale when generating it")
  p.add_argument("--out", default=None, help="append the JSON line to this file")
  p.add_argument("--image-scale", type=float, default=1.0,
                 help="linear scale of the REALISTIC image sizes (below 1 only to keep tests short)")
  p.add_argument("--enlarge-on-host", action="store_true",
                 help="data.split.enlarge_on_device=false: every tile resized on the host (finished tiles)")
  p.add_argument("--compare-images", default=None, metavar="FILE",
                 help="also time the pipeline with the images module loaded from FILE, on the same samples")
  a = p.parse_args(argv)
  size = SIZES["quick" if a.quick else "full"]
  data_dir = ensure_corpus(a.data_dir, a.scale)
  tok = Tokenizer(os.path.join(data_dir, synth.TOKENIZER_FILE))
  paper, demo = mm15.get_config(data_dir), tiny.get_config(data_dir)
  rows = size["rows"]
  on_device = False if a.enlarge_on_host else None
  stage2 = stage_setting("stage 2 OCR, static 2x2 + overview", paper, 1, rows, a.tile_size, on_device)
  stage3 = stage_setting("stage 3 SFT, dynamic 4..9 + overview", paper, 2, rows, a.tile_size, on_device)
  sources = {**pipeline.open_sources(stage2.data), **pipeline.open_sources(stage3.data)}
  realistic = RealisticImages(sources, a.image_scale)
  baseline = load_images_module(a.compare_images, not a.enlarge_on_host) if a.compare_images else None
  started = time.perf_counter()
  result = {"throughput": [
      *(throughput(s, tok, realistic.sources, size["realistic_rounds"], size["realistic_batches_per_round"],
                   "realistic", realistic, baseline) for s in (stage2, stage3)),
      *(throughput(s, tok, sources, size["rounds"], size["batches_per_round"], "synthetic", None, baseline)
        for s in (stage2, stage3))]}
  if a.compare_images:
    result["compare_images"] = a.compare_images
  # SFT packing at each config's max_images and at seq_len // tokens_per_tile (image slots cannot bind first);
  # the paper's own limits are counted in the batches of the stage-3 throughput run.
  n = size["packing_batches"]
  paper_bind = paper.stages[2].data.seq_len // stage3.tokens_per_tile
  demo_rows = demo.stages[2].batch_size
  demo_bind = demo.stages[2].data.seq_len // demo.model.tokens_per_tile
  packings = [
      dict(result["throughput"][3]["packing"], setting="mm15 SFT"),
      packing(stage_setting("mm15 SFT, tokens bind", paper, 2, rows, a.tile_size, max_images=paper_bind), tok,
              sources, n),
      packing(stage_setting("tiny SFT", demo, 2, demo_rows), tok, sources, n),
      packing(stage_setting("tiny SFT, tokens bind", demo, 2, demo_rows, max_images=demo_bind), tok, sources, n),
      dict(result["throughput"][2]["packing"], setting="mm15 OCR (stage 2, not SFT)"),
  ]
  result["packing"] = packings
  print(tables(result))
  command = " ".join(["python bench/pipeline.py", *(sys.argv[1:] if argv is None else argv)])
  line = {"bench": "pipeline",
          **machine.describe(command),
          "note": "rates per CPU second of one thread (time.process_time); ratios: medians of per-round ratios; "
                  "measured under load from other processes",
          "realistic_images": {"sizes": {k: v["sizes"] for k, v in REALISTIC.items()},
                               "grain": {k: v["grain"] for k, v in REALISTIC.items()},
                               "jpeg_quality": JPEG_QUALITY, "scale": a.image_scale},
          "seconds": round(time.perf_counter() - started, 1), "data_dir": data_dir, "quick": a.quick, **result}
  text = json.dumps(line)
  print(text)
  if a.out:
    with open(a.out, "a") as f:
      f.write(text + "\n")
  return line


if __name__ == "__main__":
  main()
