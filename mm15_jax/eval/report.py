"""Category scores, MMBase, the JSON report and a bar chart of category scores.

Benchmark scores are taken in whatever scale the caller uses (the paper reports 0..100); averages keep it.
"""
from __future__ import annotations

import io
import json
import math
from typing import Mapping, Sequence

from mm15_jax import paths

# The paper's benchmark groups (MM1.5, evaluation section). Multi-image lists only the benchmarks the recipe names.
CATEGORY_BENCHMARKS: dict[str, tuple[str, ...]] = {
    "General": ("MME", "SEED", "POPE", "LLaVA-Wild", "MM-Vet", "RealWorldQA"),
    "Text-rich": ("WTQ", "TabFact", "OCRBench", "ChartQA", "TextVQA", "DocVQA", "InfoVQA"),
    "Knowledge": ("AI2D", "ScienceQA", "MMMU", "MathVista"),
    "Refer&Ground": ("RefCOCO", "RefCOCO+", "RefCOCOg", "Flickr30k", "LVIS-Ref", "Ferret-Bench"),
    "Multi-image": ("NLVR2", "MuirBench"),
    "In-context learning": ("VL-ICL",),
    # MM1.5-Video's multiple-choice video benchmarks (frames as multi-image input).
    "Video": ("Video-MME", "MVBench", "EgoSchema", "NExTQA", "IntentQA", "LongVideoBench"),
    "UI": (),  # MM1.5-UI: no public benchmark is named by the recipe; evaluated UI benchmarks join here
}
# Held-out ("test" split) sets of the synthetic corpus, grouped like the paper's categories.
HELDOUT_CATEGORIES: dict[str, tuple[str, ...]] = {
    "General": ("sft_general",),
    "Text-rich": ("sft_text_rich",),
    "Refer&Ground": ("sft_refer_ground",),
    "Video": ("video_qa",),
    "UI": ("ui_ocr", "ui_widget", "ui_icon", "ui_ground", "ui_describe"),
}
MMBASE_CATEGORIES = ("General", "Text-rich", "Knowledge")


def _check_scores(scores: Mapping[str, float], what: str) -> dict[str, float]:
  out = {}
  for name, value in scores.items():
    value = float(value)
    if not math.isfinite(value):
      raise ValueError(f"{what} {name!r} has a non-finite score {value}")
    out[name] = value
  return out


def category_averages(scores: Mapping[str, float],
                      categories: Mapping[str, Sequence[str]] = CATEGORY_BENCHMARKS) -> dict[str, float]:
  """Plain mean of the benchmark scores present in each category; categories with none present are left out."""
  scores = _check_scores(scores, "benchmark")
  averages = {}
  for category, benchmarks in categories.items():
    present = [scores[b] for b in benchmarks if b in scores]
    if present:
      averages[category] = sum(present) / len(present)
  return averages


def mmbase(category_scores: Mapping[str, float]) -> float | None:
  """MMBase = mean(General, Text-rich, Knowledge); None unless all three are present."""
  if not all(c in category_scores for c in MMBASE_CATEGORIES):
    return None
  return sum(float(category_scores[c]) for c in MMBASE_CATEGORIES) / len(MMBASE_CATEGORIES)


def build_report(scores: Mapping[str, float],
                 categories: Mapping[str, Sequence[str]] = CATEGORY_BENCHMARKS) -> dict:
  """Per-benchmark scores, category averages, MMBase, and what each average is missing.

  `missing` lists, per averaged category, the benchmarks of the table it was computed without: such an average is
  not comparable to one over the full category. `uncategorised` lists scored benchmarks that no category holds.
  """
  scores = _check_scores(scores, "benchmark")
  averages = category_averages(scores, categories)
  known = {b for benchmarks in categories.values() for b in benchmarks}
  return {
      "benchmarks": dict(sorted(scores.items())),
      "categories": averages,
      "mmbase": mmbase(averages),
      "missing": {c: [b for b in categories[c] if b not in scores] for c in averages},
      "uncategorised": sorted(set(scores) - known),
  }


def write_report(path: str, scores: Mapping[str, float],
                 categories: Mapping[str, Sequence[str]] = CATEGORY_BENCHMARKS, **extra) -> dict:
  """Writes `build_report(...)` (plus `extra` top-level keys, e.g. step or checkpoint) as JSON; returns it."""
  report = build_report(scores, categories)
  clash = set(extra) & set(report)
  if clash:
    raise ValueError(f"extra report keys {sorted(clash)} would overwrite computed fields")
  report.update(extra)
  target = paths.path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.with_name(target.name + ".tmp")
  tmp.write_text(json.dumps(report, indent=2) + "\n")
  tmp.rename(target)  # readers never see a half-written report (an object store writes objects whole anyway)
  return report


def category_figure(category_scores: Mapping[str, float], baseline: Mapping[str, float] | None = None, *,
                    labels: tuple[str, str] = ("model", "baseline"), title: str = "", ylabel: str = "score"):
  """A matplotlib Figure with one bar per category, and the baseline's bar beside it when given.

  Built on the Agg canvas directly, so the process-wide pyplot backend is left alone.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  category_scores = _check_scores(category_scores, "category")
  if not category_scores:
    raise ValueError("category_figure needs at least one category score")
  names = list(category_scores)
  fig = Figure(figsize=(max(4.0, 1.3 * len(names) + 1.5), 3.6), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  width = 0.4 if baseline is not None else 0.7
  offset = width / 2 if baseline is not None else 0.0
  xs = list(range(len(names)))
  bars = ax.bar([x - offset for x in xs], [category_scores[n] for n in names], width, label=labels[0])
  ax.bar_label(bars, fmt="%.1f", fontsize=7)
  if baseline is not None:
    baseline = _check_scores(baseline, "baseline category")
    shown = [i for i, n in enumerate(names) if n in baseline]  # a category the baseline lacks gets no bar
    bars = ax.bar([xs[i] + offset for i in shown], [baseline[names[i]] for i in shown], width, label=labels[1])
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.legend(fontsize=8)
  ax.set_xticks(xs)
  ax.set_xticklabels(names, fontsize=8)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  return fig


def write_category_chart(path: str, category_scores: Mapping[str, float],
                         baseline: Mapping[str, float] | None = None, **kwargs) -> None:
  """Saves `category_figure(...)` as a PNG."""
  buffer = io.BytesIO()
  category_figure(category_scores, baseline, **kwargs).savefig(buffer, format="png")
  target = paths.path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(buffer.getvalue())
