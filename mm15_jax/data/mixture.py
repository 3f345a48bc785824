"""Stage data mixtures (dict source -> weight) and the exact per-block apportionment the pipeline samples with.

Stage 1: caption : interleaved : text = 50 : 10 : 40. Stage 2: the four OCR sources in equal numbers in every batch
(DataConfig.equal_sources). Stage 3 (SFT): single-image categories weighted by alpha relative to "general",
groups single-image : multi-image : text-only = 0.8 : 0.1 : 0.1, renormalised over the groups a mixture has.
With every group ("all") this gives text-rich 37.2%, refer&ground 22.5%, general 11.3%, math 5.6%, code 2.3%,
science 1.1%, multi-image 10%, text-only 10%.
"""
from __future__ import annotations

import logging
from typing import Mapping

import numpy as np

STAGE1_SOURCES = ("caption", "interleaved", "text")
STAGE2_SOURCES = ("ocr_pdfa", "ocr_idl", "ocr_rendered_text", "ocr_docstruct")
# Ratio of each single-image category to "general" inside a batch.
SFT_ALPHA = {"general": 1.0, "text_rich": 3.3, "refer_ground": 2.0, "science": 0.1, "math": 0.5, "code": 0.2}
SFT_GROUPS = {"single_image": 0.8, "multi_image": 0.1, "text_only": 0.1}
SFT_MIXTURES = {
    "base": ("general", "text_rich", "science", "math", "code"),
    "single_image": ("general", "text_rich", "science", "math", "code", "refer_ground"),
    "all": ("general", "text_rich", "science", "math", "code", "refer_ground", "multi_image", "text_only"),
}
# Category of each source of the synthetic corpus (records also carry it in their "category" field).
SFT_SOURCE_CATEGORIES = {f"sft_{c}": c for c in (*SFT_ALPHA, "multi_image", "text_only")}
# Samples per apportionment block: shares are exact over every block of this many samples.
BLOCK_SIZE = 10_000


def stage1_mixture(caption: float = 50, interleaved: float = 10, text: float = 40) -> dict[str, float]:
  return _normalise({"caption": caption, "interleaved": interleaved, "text": text})


def stage2_mixture() -> dict[str, float]:
  """Equal weights; use with DataConfig.equal_sources=True for exact per-batch equality."""
  return _normalise({s: 1.0 for s in STAGE2_SOURCES})


def category_group(category: str) -> str:
  if category in SFT_ALPHA:
    return "single_image"
  if category in ("multi_image", "text_only"):
    return category
  raise ValueError(f"unknown SFT category {category!r}; expected one of {(*SFT_ALPHA, 'multi_image', 'text_only')}")


def mixture_categories(name: str) -> tuple[str, ...]:
  """A named mixture's categories, or those of a "+"-joined list ("general+math": general plus one category)."""
  if name in SFT_MIXTURES:
    return SFT_MIXTURES[name]
  categories = tuple(c.strip() for c in name.split("+"))
  known = (*SFT_ALPHA, "multi_image", "text_only")
  unknown = [c for c in categories if c not in known]
  if unknown or not name:
    raise ValueError(f"unknown SFT mixture {name!r}: not one of {sorted(SFT_MIXTURES)} nor categories joined by "
                     f"'+' (unknown {unknown}; categories: {list(known)})")
  return categories


def sft_mixture(name: str = "all", source_categories: Mapping[str, str] | None = None,
                alpha: Mapping[str, float] | None = None, group_weights: Mapping[str, float] | None = None,
                sizes: Mapping[str, int] | None = None) -> dict[str, float]:
  """Named stage-3 mixture (or "+"-joined categories) -> {source: weight} (weights sum to 1).

  `source_categories` maps source names to categories (default: the synthetic corpus). Sources whose category is
  not in the mixture are left out; several sources of one category share its weight in proportion to `sizes`
  (their sample counts), or equally without sizes. `alpha` / `group_weights` replace the paper's values.
  """
  wanted = mixture_categories(name)
  source_categories = dict(SFT_SOURCE_CATEGORIES if source_categories is None else source_categories)
  alpha = dict(SFT_ALPHA if alpha is None else alpha)
  group_weights = dict(SFT_GROUPS if group_weights is None else group_weights)
  by_category: dict[str, list[str]] = {}
  for source, category in sorted(source_categories.items()):
    category_group(category)  # validates
    if category in wanted:
      by_category.setdefault(category, []).append(source)
  missing = [c for c in wanted if c not in by_category]
  if missing:
    raise ValueError(f"SFT mixture {name!r}: no source for categories {missing}")
  groups = {category_group(c) for c in by_category}
  group_total = sum(group_weights[g] for g in groups)
  alpha_total = sum(alpha[c] for c in by_category if c in alpha)
  weights = {}
  for category, sources in by_category.items():
    group = category_group(category)
    share = group_weights[group] / group_total
    if group == "single_image":
      share *= alpha[category] / alpha_total
    if sizes is None:
      for source in sources:
        weights[source] = share / len(sources)
    else:
      total = sum(sizes[source] for source in sources)
      if total <= 0:
        raise ValueError(f"SFT mixture {name!r}: the datasets of category {category!r} {sources} are empty")
      for source in sources:
        weights[source] = share * sizes[source] / total
  return _normalise(weights)


def discover_sft_sources(data_dir: str) -> dict[str, str]:
  """Datasets of `data_dir` with a "train" split whose first record is an sft record naming an SFT category."""
  from mm15_jax.data import records  # only resolution at start reads the data dir
  known = (*SFT_ALPHA, "multi_image", "text_only")
  found = {}
  for name in records.list_sources(data_dir):
    try:
      source = records.open_source(data_dir, name, "train")
    except (FileNotFoundError, ValueError):
      continue
    first = source[0] if len(source) else {}
    if first.get("kind") == "sft" and first.get("category") in known:
      found[name] = first["category"]
  return found


def check_sft(sft) -> None:
  """The settings of data.sft (an SftMixtureConfig) that need no data: `within`, alpha and group-weight keys."""
  if sft.within not in ("size", "equal"):
    raise ValueError(f"config key data.sft.within must be 'size' or 'equal', got {sft.within!r}")
  for key, given, known in (("alpha", sft.alpha, SFT_ALPHA), ("group_weights", sft.group_weights, SFT_GROUPS)):
    unknown = sorted(set(given) - set(known))
    if unknown:
      raise ValueError(f"config key data.sft.{key}: unknown {unknown}; known: {sorted(known)}")
  if sft.name:
    mixture_categories(sft.name)


def resolve_sft(data_cfg, log=print):
  """`data_cfg` with data.mixture set from data.sft when data.sft.name is set (else unchanged)."""
  import dataclasses
  from mm15_jax.data import records
  sft = data_cfg.sft
  if not sft.name:
    return data_cfg
  check_sft(sft)
  sources = dict(sft.sources) or discover_sft_sources(data_cfg.data_dir)
  sizes = ({n: len(records.open_source(data_cfg.data_dir, n, "train")) for n in sources}
           if sft.within == "size" else None)
  try:
    weights = sft_mixture(sft.name, sources, {**SFT_ALPHA, **sft.alpha}, {**SFT_GROUPS, **sft.group_weights},
                          sizes=sizes)
  except ValueError as e:
    raise ValueError(f"config key data.sft: {e} (datasets found: {sources})") from None
  log(f"SFT mixture {sft.name!r} over {len(weights)} datasets of {data_cfg.data_dir} (within a category: "
      f"{sft.within})")
  return dataclasses.replace(data_cfg, mixture=weights)


def _normalise(weights: Mapping[str, float]) -> dict[str, float]:
  bad = {k: v for k, v in weights.items() if not v >= 0}
  if bad or not weights:
    raise ValueError(f"mixture weights must be >= 0 and not empty, got {dict(weights)}")
  total = float(sum(weights.values()))
  if total <= 0:
    raise ValueError(f"mixture weights sum to 0: {dict(weights)}")
  return {k: float(v) / total for k, v in sorted(weights.items())}


def apportion(weights: Mapping[str, float], block_size: int = BLOCK_SIZE) -> dict[str, int]:
  """Samples of each source per block of `block_size` (largest remainder; sums to block_size exactly).

  Sources are in sorted order. A source with positive weight always gets at least one sample per block.
  """
  names = sorted(weights)
  w = np.array([weights[n] for n in names], np.float64)
  w = w / w.sum()
  exact = w * block_size
  counts = np.floor(exact).astype(np.int64)
  remainder_order = np.lexsort((np.arange(len(names)), -(exact - counts)))
  for i in remainder_order[:block_size - counts.sum()]:
    counts[i] += 1
  for i in np.flatnonzero((w > 0) & (counts == 0)):  # tiny weights: one sample, taken from the largest source
    counts[i] += 1
    counts[np.argmax(counts)] -= 1
  return {n: int(c) for n, c in zip(names, counts)}


def sample_shares(weights: Mapping[str, float], extra_sources: Mapping[str, float] | None = None) -> dict:
  """Each source's share of the samples: the extra sources' as given, the mixture's the rest in its proportions."""
  extra = dict(extra_sources or {})
  total, rest = sum(weights.values()), 1.0 - sum(extra.values())
  return {**{n: rest * w / total for n, w in weights.items()}, **extra}


def describe_mixture(weights: Mapping[str, float], *, equal_sources: bool = False,
                     extra_sources: Mapping[str, float] | None = None, block_size: int = BLOCK_SIZE) -> str:
  """Realised shares (what the pipeline really samples), one line per source."""
  extra = dict(extra_sources or {})
  merged = sample_shares(weights, extra)
  names = sorted(merged)
  if equal_sources:
    rest = 1.0 - sum(extra.values())
    shares = {n: extra[n] if n in extra else rest / len(weights) for n in names}
    header = f"data mixture: {len(weights)} sources in equal numbers in every batch"
    if extra:
      header += f", beside {len(extra)} extra source(s)"
  else:
    counts = apportion(merged, block_size)
    shares = {n: counts[n] / block_size for n in names}
    header = f"data mixture: realised shares over every block of {block_size} samples"
  lines = [header] + [f"  {i:2d} {n:24s} weight {merged[n]:7.4f}  realised {shares[n] * 100:7.3f}%"
                      + ("  (extra)" if n in extra else "") for i, n in enumerate(names)]
  return "\n".join(lines)


def log_mixture(weights: Mapping[str, float], *, equal_sources: bool = False,
                extra_sources: Mapping[str, float] | None = None) -> str:
  """Prints the realised shares at start-up (and logs them); returns the text."""
  text = describe_mixture(weights, equal_sources=equal_sources, extra_sources=extra_sources)
  print(text, flush=True)
  logging.info("%s", text)
  return text
