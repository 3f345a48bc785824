"""Grain input pipeline of a stage: shard per host, mix, decode/split/tokenise, pack, batch.

Data flow (everything before packing is a pure function of a "unit" index u, so workers can compute it anywhere):
  unit u -> (source, position) pairs  [_UnitSampler: weighted blocks, or one sample of every source]
         -> record index on this host [each source sharded per host FIRST, then shuffled per epoch]
         -> Sample (samples.make_sample), bad records skipped with a deterministic replacement
  MapDataset.range(...).map(_UnitMaker) -> to_iter_dataset -> [mp_prefetch] -> _PackedBatchIterator (main process)

Packing is best-fit decreasing over a window of PACK_WINDOW pending units: the pending units are placed largest
first, each sample into the row it leaves with the fewest free tokens; units that fit nowhere stay pending, new units
are drawn to refill the window, and the batch is closed when none of PACK_WINDOW pending units fits any row. Units
pending for more than MAX_WAIT draws go first, oldest first, so none waits for ever. A row is limited by its tokens
(data.seq_len) and its image slots (data.max_images); where image slots bind first (a mixture with more than
max_images * tokens_per_tile image tokens per seq_len) rows close with free tokens: the packer counts such rows and
warns with the limit that lets tokens bind. The iterator state is (next unit, units pending, counters, parent
state): JSON-able, and restoring it (with the same seed) gives identical following batches. A unit is one sample
(weighted mixing) or, with equal_sources, one sample of every source, placed atomically: every batch then holds
exactly as many samples of each source. data.extra_sources (e.g. synthetic captions in stage 2) are drawn alone,
as fixed shares of the samples, beside the mixture; the equal units keep their equality.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from mm15_jax.config import DataConfig
from mm15_jax.data import images as images_lib
from mm15_jax.data import mixture as mixture_lib
from mm15_jax.data import samples as samples_lib
from mm15_jax.data.batch import Batch
from mm15_jax.data.tokenizer import Tokenizer

MIN_RECORDS_FOR_BAD_FRACTION = 100  # the bad-record limit applies after this many records
MAX_BAD_IN_A_ROW = 32               # consecutive bad records of one draw that stop the run
PACK_WINDOW = 32                    # pending units when packing: a batch closes when none of them fits
MAX_WAIT = 8 * PACK_WINDOW          # a unit pending for more draws than this is placed first
LOG_EVERY = 100                     # batches between packing-efficiency log lines
IMAGE_BOUND_WARNING = 0.25          # share of image-bound rows above which the packer warns (once)
_RETRY_STRIDE = 1 << 40             # replacement draws land in far-away (independently shuffled) epochs


def source_names(data_cfg: DataConfig) -> list[str]:
  """Sources of a stage (the mixture's and data.extra_sources) in the order of `source_ids` (sorted names)."""
  if not data_cfg.mixture:
    raise ValueError("data.mixture is empty: a stage needs at least one source")
  bad = {k: v for k, v in data_cfg.mixture.items() if not v > 0}
  if bad:
    raise ValueError(f"data.mixture weights must be > 0, got {bad}")
  extra = data_cfg.extra_sources
  both = sorted(set(extra) & set(data_cfg.mixture))
  if both:
    raise ValueError(f"config key data.extra_sources: {both} already in data.mixture; name each source once")
  if any(not 0 < v < 1 for v in extra.values()) or not sum(extra.values()) < 1:
    raise ValueError(f"config key data.extra_sources={extra}: shares of the stage's samples, each in (0, 1) and "
                     "summing below 1")
  return sorted({*data_cfg.mixture, *extra})


def open_sources(data_cfg: DataConfig, split: str = "train") -> dict[str, Sequence[dict]]:
  """Random-access record sequences of every source of a stage, read from data_cfg.data_dir."""
  from mm15_jax.data import records  # pylint: disable=g-import-not-at-top
  if not data_cfg.data_dir:
    raise ValueError("data.data_dir is empty")
  return {name: records.open_source(data_cfg.data_dir, name, split) for name in source_names(data_cfg)}


class _UnitSampler:
  """Unit index -> [(source id, position in that source's per-host stream)], a pure function of u.

  A unit draws one "kind": a single source (weighted mixing), or with `equal` one sample of every mixture source
  at once. `extra` ({source id: share of all samples}) adds sources drawn alone beside them: the mixture's sources
  share the rest of the samples in their own proportions (with `equal`: in equal numbers). Blocks of `block_size`
  units hold exactly `apportion` of the kinds' unit weights, in an order shuffled per block; a source's position is
  the count of its kind's earlier units. With one kind, unit u is at position u.
  """

  def __init__(self, weights: list[float], equal: bool, seed: int, block_size: int = mixture_lib.BLOCK_SIZE,
               extra: Mapping[int, float] | None = None):
    self.seed, self.block_size = seed, block_size
    extra = dict(extra or {})
    main = [i for i in range(len(weights)) if i not in extra]
    rest = 1.0 - sum(extra.values())
    if equal:  # a unit of every main source holds len(main) samples: unit weight = sample share / len(main)
      kinds = [(tuple(main), rest / len(main))]
    elif extra:
      total = sum(weights[i] for i in main)
      kinds = [((i,), rest * weights[i] / total) for i in main]
    else:
      kinds = [((i,), w) for i, w in enumerate(weights)]
    kinds += [((i,), share) for i, share in sorted(extra.items())]
    self.kinds = [k for k, _ in kinds]
    counts = mixture_lib.apportion({i: w for i, (_, w) in enumerate(kinds)}, block_size)
    self.counts = np.array([counts[i] for i in range(len(kinds))], np.int64)
    self._block, self._order, self._rank = -1, None, None

  def __getstate__(self):
    return dict(self.__dict__, _block=-1, _order=None, _rank=None)

  def _load_block(self, block: int) -> None:
    order = np.repeat(np.arange(len(self.counts)), self.counts)
    np.random.default_rng([self.seed, block]).shuffle(order)
    rank = np.empty_like(order)
    for k in range(len(self.counts)):
      where = np.flatnonzero(order == k)
      rank[where] = np.arange(len(where))
    self._block, self._order, self._rank = block, order, rank

  def __call__(self, u: int) -> list[tuple[int, int]]:
    if len(self.kinds) == 1:
      return [(s, u) for s in self.kinds[0]]
    block, pos = divmod(u, self.block_size)
    if block != self._block:
      self._load_block(block)
    k = int(self._order[pos])
    return [(s, block * int(self.counts[k]) + int(self._rank[pos])) for s in self.kinds[k]]


class _UnitMaker:
  """Unit index -> {"samples": [(Sample, source_id)], "bad": [(source, index, reason)], "seen"}."""

  def __init__(self, names, sources, sampler, tokenizer, spec, seed, process_index, process_count):
    self.names, self.sources, self.sampler = names, sources, sampler
    self.tokenizer, self.spec = tokenizer, spec
    # Per source: stream position -> record index; host shard first, then a per-epoch shuffle.
    self.index_streams = []
    for s, name in enumerate(names):
      n = len(sources[name])
      if n < process_count:
        raise ValueError(f"source {name!r} has {n} records, fewer than {process_count} hosts")
      shard = grain.MapDataset.range(n)[process_index::process_count]
      shuffle_seed = int(np.random.SeedSequence([seed, s]).generate_state(1)[0])
      self.index_streams.append(shard.shuffle(seed=shuffle_seed).repeat())

  def records(self, u: int) -> list[tuple[str, int]]:
    """(source, record index) of each sample of unit u, as first drawn (before any bad-record replacement)."""
    return [(self.names[s], int(self.index_streams[s][position])) for s, position in self.sampler(int(u))]

  def __call__(self, u: int) -> dict[str, Any]:
    images_lib.keep_buffers_in_heap()  # in whichever process computes units (input workers included)
    out = {"samples": [], "bad": [], "seen": 0}
    for s, position in self.sampler(int(u)):
      name = self.names[s]
      for attempt in range(MAX_BAD_IN_A_ROW):
        index = int(self.index_streams[s][position + attempt * _RETRY_STRIDE])
        out["seen"] += 1
        where = f"{name}[{index}]"
        try:
          sample = samples_lib.make_sample(self.sources[name][index], self.tokenizer, self.spec, where=where)
        except (ValueError, KeyError, TypeError) as e:
          reason = str(e)
          out["bad"].append((name, index, reason if reason.startswith(where) else f"{where}: {reason}"))
          continue
        out["samples"].append((sample, s))
        break
      else:
        raise RuntimeError(f"source {name!r}: {MAX_BAD_IN_A_ROW} bad records in a row; last: {out['bad'][-1][2]}")
    return out


class _Rows:
  """One batch under construction: best-fit placement of samples into rows."""

  def __init__(self, batch_size: int, seq_len: int, max_images: int, tile_size: int, pack: bool, pad_id: int,
               enlarge_on_device: bool):
    b, t, n, s = batch_size, seq_len, max_images, tile_size
    self.seq_len, self.max_images, self.pack = t, n, pack
    self.tokens = np.full((b, t), pad_id, np.int32)
    self.targets = np.full((b, t), pad_id, np.int32)
    self.loss_mask = np.zeros((b, t), np.float32)
    self.segment_ids = np.zeros((b, t), np.int32)
    self.positions = np.zeros((b, t), np.int32)
    self.source_ids = np.full((b, t), -1, np.int32)
    self.images = np.zeros((b, n, s, s, 3), np.uint8)
    self.image_mask = np.zeros((b, n), bool)
    # Tiles' source pixels and extents for the model to enlarge (SplitConfig.enlarge_on_device), or None.
    self.image_extent = np.zeros((b, n, 4), np.int32) if enlarge_on_device else None
    self.stat_bad_records = np.zeros((b,), np.int32)
    self.stat_samples = np.zeros((b,), np.int32)
    self.used_tokens = np.zeros((b,), np.int64)
    self.used_images = np.zeros((b,), np.int64)

  def full(self) -> bool:
    if self.pack:
      return bool(np.all(self.used_tokens >= self.seq_len))
    return bool(np.all(self.stat_samples > 0))

  def place(self, unit: dict) -> bool:
    """Places all samples of the unit, or none (returns False).

    Packing: each sample goes to the row it leaves with the fewest free tokens (then image slots, then the lowest
    row), which keeps the roomiest rows for larger samples. Without packing: the first empty row.
    """
    used_t, used_i, taken = self.used_tokens.copy(), self.used_images.copy(), self.stat_samples > 0
    rows = []
    for sample, _ in unit["samples"]:
      length = len(sample.ids) - 1
      if self.pack:
        free_t = self.seq_len - used_t - length
        free_i = self.max_images - used_i - sample.n_tiles
        candidates = np.flatnonzero((free_t >= 0) & (free_i >= 0))
        if not len(candidates):
          return False
        r = int(candidates[np.lexsort((candidates, free_i[candidates], free_t[candidates]))[0]])
      else:
        candidates = np.flatnonzero(~taken)
        if not len(candidates):
          return False
        r = int(candidates[0])
      rows.append(r)
      used_t[r] += length
      used_i[r] += sample.n_tiles
      taken[r] = True
    for (sample, source_id), r in zip(unit["samples"], rows):
      self._write(r, sample, source_id)
    self.stat_bad_records[rows[0]] += len(unit["bad"])
    return True

  def image_bound(self, units: Sequence[dict]) -> np.ndarray:
    """bool [B]: rows with free tokens for one of the samples of `units` but too few free image slots."""
    bound = np.zeros(self.used_tokens.shape, bool)
    for unit in units:
      for sample, _ in unit["samples"]:
        bound |= ((self.used_tokens + len(sample.ids) - 1 <= self.seq_len)
                  & (self.used_images + sample.n_tiles > self.max_images))
    return bound

  def _write(self, r: int, sample: samples_lib.Sample, source_id: int) -> None:
    ids, n_tiles = sample.ids, sample.n_tiles
    length, start, first_image = len(ids) - 1, int(self.used_tokens[r]), int(self.used_images[r])
    span = slice(start, start + length)
    self.stat_samples[r] += 1
    self.tokens[r, span] = ids[:-1]
    self.targets[r, span] = ids[1:]
    self.loss_mask[r, span] = sample.loss_mask[1:]
    self.segment_ids[r, span] = self.stat_samples[r]
    self.positions[r, span] = np.arange(length)
    self.source_ids[r, span] = source_id
    slots = slice(first_image, first_image + n_tiles)
    sample.write_tiles(self.images[r, slots], None if self.image_extent is None else self.image_extent[r, slots])
    self.image_mask[r, slots] = True
    self.used_tokens[r] += length
    self.used_images[r] += n_tiles

  def batch(self) -> Batch:
    return Batch(tokens=self.tokens, targets=self.targets, loss_mask=self.loss_mask, segment_ids=self.segment_ids,
                 positions=self.positions, images=self.images, image_mask=self.image_mask,
                 source_ids=self.source_ids, image_extent=self.image_extent,
                 stats={"bad_records": self.stat_bad_records, "samples": self.stat_samples})


@dataclasses.dataclass
class _PackOptions:
  batch_size: int
  seq_len: int
  max_images: int
  tile_size: int
  pack: bool
  pad_id: int
  max_bad_fraction: float
  tokens_per_tile: int
  enlarge_on_device: bool


class _PackedBatchIterator(grain.DatasetIterator):
  """Units -> batches; checkpointable (get_state/set_state)."""

  def __init__(self, parent: grain.DatasetIterator, maker: _UnitMaker, options: _PackOptions):
    super().__init__(parent)
    self._maker, self._opt = maker, options
    self._next_unit = 0
    self._waiting: list[tuple[int, dict]] = []
    self._seen = self._bad = self._batches = 0
    self._real_tokens = self._real_images = self._image_bound_rows = 0
    self._warned_image_bound = False

  @property
  def packing_efficiency(self) -> float:
    """Share of token slots holding real tokens, over all batches so far."""
    total = self._batches * self._opt.batch_size * self._opt.seq_len
    return self._real_tokens / total if total else 0.0

  @property
  def packing_stats(self) -> dict[str, Any]:
    """Over all batches so far: token and image-slot efficiency, share of rows image-bound when their batch closed
    (free tokens for a pending sample, too few free image slots)."""
    rows = self._batches * self._opt.batch_size
    return {"batches": self._batches, "token_efficiency": self.packing_efficiency,
            "image_slot_efficiency": self._real_images / (rows * self._opt.max_images) if rows else 0.0,
            "image_bound_rows": self._image_bound_rows / rows if rows else 0.0}

  @property
  def bad_records(self) -> tuple[int, int]:
    """(bad, seen) records so far."""
    return self._bad, self._seen

  @property
  def units_drawn(self) -> int:
    """Units drawn from the mixture so far: 0 .. units_drawn - 1 are placed in a batch or pending."""
    return self._next_unit

  def unit_records(self, u: int) -> list[tuple[str, int]]:
    """(source, record index) of each sample of unit u (before any bad-record replacement)."""
    return self._maker.records(u)

  def _pull(self) -> tuple[int, dict]:
    unit = next(self._parent)
    u, self._next_unit = self._next_unit, self._next_unit + 1
    self._seen += unit["seen"]
    self._bad += len(unit["bad"])
    for name, index, reason in unit["bad"]:
      logging.warning("skipping bad record %s[%d]: %s", name, index, reason)
    if (unit["bad"] and self._seen >= MIN_RECORDS_FOR_BAD_FRACTION
        and self._bad > self._opt.max_bad_fraction * self._seen):
      raise RuntimeError(
          f"{self._bad} bad records out of {self._seen} ({self._bad / self._seen:.2%}) exceed "
          f"data.max_bad_fraction={self._opt.max_bad_fraction}; last: {unit['bad'][-1][2]}")
    return u, unit

  def _placement_order(self, pending: tuple[int, dict]):
    """Overdue units first (oldest first), then the largest share of a row's tokens or image slots first."""
    u, unit = pending
    if self._next_unit - u > MAX_WAIT:
      return (0, 0.0, u)
    tokens = sum(len(sample.ids) - 1 for sample, _ in unit["samples"])
    tiles = sum(sample.n_tiles for sample, _ in unit["samples"])
    return (1, -max(tokens / self._opt.seq_len, tiles / self._opt.max_images), u)

  def __next__(self) -> Batch:
    opt = self._opt
    rows = _Rows(opt.batch_size, opt.seq_len, opt.max_images, opt.tile_size, opt.pack, opt.pad_id,
                 opt.enlarge_on_device)
    window = PACK_WINDOW if opt.pack else 1
    # Rows only fill up while a batch is built: a unit that did not fit once cannot fit later in this batch.
    unchecked, failed = self._waiting, []
    self._waiting = []
    while True:
      while len(unchecked) + len(failed) < window:
        unchecked.append(self._pull())
      if not unchecked:
        break  # a whole window of pending units fits nowhere
      if opt.pack:
        unchecked.sort(key=self._placement_order)
      for pending in unchecked:
        if not rows.place(pending[1]):
          failed.append(pending)
      unchecked = []
      if rows.full():
        break
    self._waiting = failed
    if not rows.stat_samples.any():
      raise RuntimeError("no sample fits an empty batch (batch_size smaller than the samples of one unit?)")
    self._batches += 1
    self._real_tokens += int(rows.used_tokens.sum())
    self._real_images += int(rows.used_images.sum())
    if opt.pack:
      self._image_bound_rows += int(rows.image_bound([unit for _, unit in failed]).sum())
    if self._batches % LOG_EVERY == 0:
      self._log_packing()
    return rows.batch()

  def _log_packing(self) -> None:
    stats, opt = self.packing_stats, self._opt
    logging.info("data: %d batches, packing efficiency %.3f (image slots %.3f, image-bound rows %.1f%%), "
                 "bad records %d of %d", self._batches, stats["token_efficiency"], stats["image_slot_efficiency"],
                 100 * stats["image_bound_rows"], self._bad, self._seen)
    if stats["image_bound_rows"] > IMAGE_BOUND_WARNING and not self._warned_image_bound:
      self._warned_image_bound = True
      logging.warning(
          "data: %.0f%% of rows closed on the image-slot limit data.max_images=%d with tokens free (packing "
          "efficiency %.3f of data.seq_len=%d); a tile costs %d tokens, so data.max_images >= %d lets tokens bind "
          "(padded image slots are still encoded)", 100 * stats["image_bound_rows"], opt.max_images,
          stats["token_efficiency"], opt.seq_len, opt.tokens_per_tile, opt.seq_len // max(opt.tokens_per_tile, 1))

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "next_unit": self._next_unit,
            "waiting": [u for u, _ in self._waiting], "seen": self._seen, "bad": self._bad,
            "batches": self._batches, "real_tokens": self._real_tokens, "real_images": self._real_images,
            "image_bound_rows": self._image_bound_rows}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._next_unit = int(state["next_unit"])
    # Pending units are a pure function of their index: recompute instead of storing samples.
    self._waiting = [(int(u), self._maker(int(u))) for u in state["waiting"]]
    self._seen, self._bad = int(state["seen"]), int(state["bad"])
    self._batches, self._real_tokens = int(state["batches"]), int(state["real_tokens"])
    # States written before these counters existed resume with them at 0.
    self._real_images = int(state.get("real_images", 0))
    self._image_bound_rows = int(state.get("image_bound_rows", 0))

  def close(self) -> None:
    close = getattr(self._parent, "close", None)
    if close is not None:
      close()


class PackedBatchDataset(grain.IterDataset):
  def __init__(self, parent: grain.IterDataset, maker: _UnitMaker, options: _PackOptions):
    super().__init__(parent)
    self._maker, self._options = maker, options

  def __iter__(self) -> _PackedBatchIterator:
    return _PackedBatchIterator(self._parent.__iter__(), self._maker, self._options)

  def __str__(self) -> str:
    return f"PackedBatchDataset({self._options})"


def make_dataset(data_cfg: DataConfig, *, sources: Mapping[str, Sequence[dict]], tokenizer: Tokenizer,
                 tokens_per_tile: int, tile_size: int, batch_size: int, process_index: int = 0,
                 process_count: int = 1, seed: int = 0, read_threads: int = 2) -> PackedBatchDataset:
  """The stage's Grain dataset of batches (see `make_pipeline`)."""
  names = source_names(data_cfg)
  missing = [n for n in names if n not in sources]
  if missing:
    raise ValueError(f"data.mixture names sources {missing} that were not given (have {sorted(sources)})")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  equal = sorted(data_cfg.mixture)  # extra sources are drawn alone, beside the equal units
  if data_cfg.equal_sources and batch_size % len(equal):
    raise ValueError(f"data.equal_sources=True needs the per-host batch size ({batch_size}) to be a multiple of "
                     f"the number of sources ({len(equal)}: {equal})")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
  images_lib.check_split_config(data_cfg.split)
  spec = samples_lib.SampleSpec.from_config(data_cfg, tile_size=tile_size, tokens_per_tile=tokens_per_tile)
  full_seed = int(np.random.SeedSequence([data_cfg.seed, seed]).generate_state(1)[0])
  extra = {i: data_cfg.extra_sources[n] for i, n in enumerate(names) if n in data_cfg.extra_sources}
  sampler = _UnitSampler([data_cfg.mixture.get(n, 0.0) for n in names], data_cfg.equal_sources, full_seed,
                         extra=extra)
  maker = _UnitMaker(names, {n: sources[n] for n in names}, sampler, tokenizer, spec, full_seed, process_index,
                     process_count)
  units = grain.MapDataset.range(sys.maxsize).map(maker).to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=8))
  if data_cfg.num_workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags; programs without absl.app
      flags.FLAGS.mark_as_parsed()
    units = units.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  options = _PackOptions(batch_size=batch_size, seq_len=data_cfg.seq_len, max_images=data_cfg.max_images,
                         tile_size=tile_size, pack=data_cfg.pack, pad_id=tokenizer.pad_id,
                         max_bad_fraction=data_cfg.max_bad_fraction, tokens_per_tile=tokens_per_tile,
                         enlarge_on_device=data_cfg.split.enlarge_on_device)
  return PackedBatchDataset(units, maker, options)


def make_pipeline(data_cfg: DataConfig, *, sources: Mapping[str, Sequence[dict]], tokenizer: Tokenizer,
                  tokens_per_tile: int, tile_size: int, batch_size: int, process_index: int = 0,
                  process_count: int = 1, seed: int = 0, read_threads: int = 2) -> _PackedBatchIterator:
  """Checkpointable iterator of this host's batches (`Batch`es of numpy arrays).

  `sources`: source name -> random-access sequence of decoded records (all of them: each is sharded here by
  process_index/process_count before mixing). `batch_size`: rows per batch on this host. `tile_size`: the stage's
  image size. `read_threads`: Grain threads computing units ahead in this process (0: each unit computed on
  demand, in the calling thread). State: `get_state()` / `set_state(state)`, JSON-able; `packing_stats` reports
  token and image-slot efficiency.
  """
  ds = make_dataset(data_cfg, sources=sources, tokenizer=tokenizer, tokens_per_tile=tokens_per_tile,
                    tile_size=tile_size, batch_size=batch_size, process_index=process_index,
                    process_count=process_count, seed=seed, read_threads=read_threads)
  if process_index == 0:
    mixture_lib.log_mixture(data_cfg.mixture, equal_sources=data_cfg.equal_sources,
                            extra_sources=data_cfg.extra_sources)
  return iter(ds)


class ConcatenatedHosts:
  """The batches of several hosts' pipelines joined along the batch axis, in process order (checkpointable).

  `make_array_from_process_local_data` puts host p's rows in the p-th block of the global batch, so one process
  reading the shards of `n` hosts this way trains on exactly the global batches that `n` processes build.
  """

  def __init__(self, iterators):
    self.iterators = list(iterators)

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    return Batch.concatenate([next(it) for it in self.iterators])

  def get_state(self) -> bytes:
    return json.dumps([it.get_state() for it in self.iterators]).encode()

  def set_state(self, state: bytes) -> None:
    states = json.loads(state)
    if len(states) != len(self.iterators):
      raise ValueError(f"data iterator state holds {len(states)} host shards, this run reads {len(self.iterators)}")
    for it, st in zip(self.iterators, states):
      it.set_state(st)

  def start_prefetch(self) -> None:
    for it in self.iterators:
      it.start_prefetch()
