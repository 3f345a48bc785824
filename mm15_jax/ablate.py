"""`mm15 ablate`: a grid of config overrides -> one short run per point -> held-out evaluation -> table and plot.

The grid is the product of `--grid key=v1,v2` lists (keys are the dotted keys of `--set`). Each point trains the
swept stages (by default the last one) and is evaluated on the held-out suites. Stages before the swept ones are
shared: when the first swept stage starts from "previous", the chain of stages it needs is trained once, with the
base config, in WORKDIR/shared, and every point starts from that checkpoint instead of retraining it.

WORKDIR/
  shared/<stage>/       the shared earlier stages (config.json: the base config they were trained with)
  points/<point>/       one folder per point, named by its values ("text_rich=0.5"): the swept stages'
                        checkpoints and logs, config.json, eval/report.json
  ablation.md, ablation.json, ablation.png    one row (bar group) per point

A point whose eval/report.json exists is finished and not rerun; an interrupted point resumes from its own
checkpoints. A folder holding another config than its point's is refused rather than mixed.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import re
from typing import Sequence

from etils import epath

from mm15_jax import config as config_lib
from mm15_jax import layout
from mm15_jax.config import Experiment
from mm15_jax.data import mixture as mixture_lib

REPORT = "eval/report.json"


class AblationError(ValueError):
  """Bad grid, stage selection or workdir: one line for the user."""


@dataclasses.dataclass(frozen=True)
class Point:
  name: str                     # folder name, e.g. "text_rich=0.5"
  values: dict[str, str]        # grid key -> value as given (parsed like --set)

  def assignments(self) -> list[str]:
    return [f"{k}={v}" for k, v in self.values.items()]


def split_values(text: str) -> list[str]:
  """"0.5,2" -> ["0.5", "2"]; commas inside brackets, braces or quotes do not split ('{"a":1,"b":2},{}')."""
  values, depth, quote, start = [], 0, "", 0
  for i, ch in enumerate(text):
    if quote:
      quote = "" if ch == quote and text[i - 1] != "\\" else quote
    elif ch in "\"'":
      quote = ch
    elif ch in "[{":
      depth += 1
    elif ch in "]}":
      depth -= 1
    elif ch == "," and depth == 0:
      values.append(text[start:i])
      start = i + 1
  values.append(text[start:])
  return values


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
  """["key=v1,v2", ...] -> {key: [v1, v2]}, in the order given."""
  grid = {}
  for spec in specs:
    key, sep, raw = spec.partition("=")
    key = key.strip()
    if not sep or not key or not raw:
      raise AblationError(f"--grid {spec!r}: expected key=value1,value2,...")
    if key in grid:
      raise AblationError(f"--grid {key}: given twice; list all its values in one --grid")
    values = [v.strip() for v in split_values(raw)]
    if any(not v for v in values) or len(set(values)) != len(values):
      raise AblationError(f"--grid {key}: empty or repeated value in {raw!r}")
    grid[key] = values
  if not grid:
    raise AblationError("mm15 ablate: give at least one --grid key=value1,value2")
  return grid


def _stage_index(exp: Experiment, head: str) -> int | None:
  names = [s.name for s in exp.stages]
  if head in names:
    return names.index(head)
  if head.lstrip("-").isdigit() and -len(names) <= int(head) < len(names):
    return int(head) % len(names)
  return None


def swept_stages(exp: Experiment, stages: str) -> list[int]:
  """Indices of the comma-separated stage names (default: the last stage); they must be consecutive."""
  names = [s.name for s in exp.stages]
  if not names:
    raise AblationError("mm15 ablate: the config has no stages")
  wanted = [s.strip() for s in stages.split(",") if s.strip()] or [names[-1]]
  unknown = [s for s in wanted if s not in names]
  if unknown:
    raise AblationError(f"--stage: unknown stage(s) {unknown}; this config has {names}")
  indices = sorted(names.index(s) for s in set(wanted))
  if indices != list(range(indices[0], indices[-1] + 1)):
    raise AblationError(f"--stage: {wanted} are not consecutive stages of {names}")
  return indices


def check_grid(exp: Experiment, grid: dict[str, list[str]], swept: Sequence[int]) -> None:
  """Every key and value applies to the config, and every key changes only what the points train themselves."""
  for key, values in grid.items():
    parts = key.split(".")
    if parts[0] == "stages":
      index = _stage_index(exp, parts[1]) if len(parts) > 1 else None
      if index is not None and index not in swept:
        raise AblationError(f"--grid {key}: stage {exp.stages[index].name!r} is shared by every point (trained "
                            f"once); add it to --stage to sweep it")
    elif parts[0] == "model" and len(swept) < len(exp.stages):
      raise AblationError(f"--grid {key}: a model change needs every stage swept (--stage "
                          f"{','.join(s.name for s in exp.stages)})")
    for value in values:
      try:
        changed = config_lib.override(copy.deepcopy(exp), [f"{key}={value}"])
        for i in swept:  # what can be checked without data: a bad value fails here, not after the shared stages
          mixture_lib.check_sft(changed.stages[i].data.sft)
      except (KeyError, TypeError, ValueError) as e:
        raise AblationError(f"--grid {key}: {e.args[0] if e.args else e}") from None


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
  """Each key's shortest dotted suffix that no other key ends with: alpha.text_rich -> text_rich."""
  out = {}
  for key in keys:
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
      suffix = ".".join(parts[-n:])
      if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
        break
    out[key] = suffix
  return out


def _folder_safe(value: str) -> str:
  """'{"math": 1}' -> 'math_1': runs of characters a folder name should not hold become one underscore."""
  return re.sub(r"[^A-Za-z0-9._+-]+", "_", value).strip("_") or "_"


def points(grid: dict[str, list[str]]) -> list[Point]:
  """The product of the grid's values, first key slowest; folder names encode the values."""
  short = _short_keys(list(grid))
  out, seen = [], set()
  for combo in itertools.product(*grid.values()):
    values = dict(zip(grid, combo))
    name = ",".join(f"{short[k]}={_folder_safe(v)}" for k, v in values.items())
    if name in seen:  # values that differ only in characters a folder name cannot hold
      name = f"{name}-{len(out)}"
    seen.add(name)
    out.append(Point(name, values))
  return out


def point_experiment(exp: Experiment, point: Point, swept: Sequence[int], shared_dir: epath.Path) -> Experiment:
  """The base experiment with the point's values; its first swept stage starts from the shared checkpoint."""
  out = config_lib.override(copy.deepcopy(exp), point.assignments())
  first = out.stages[swept[0]]
  if first.init_from == "previous" and swept[0] > 0:
    first.init_from = layout.checkpoint_dir(str(shared_dir), out.stages[swept[0] - 1])
  return out


def shared_chain(exp: Experiment, first_swept: int) -> list[int]:
  """The stages before `first_swept` that its initialisation needs: the unbroken chain of init_from="previous"."""
  chain, index = [], first_swept
  while index > 0 and exp.stages[index].init_from == "previous":
    index -= 1
    chain.insert(0, index)
  return chain


# Experiment fields that change where a run reports, not what it trains: a rerun may change them.
_REPORTING = ("logging", "profile")


def _same_config(saved: dict, current: dict) -> bool:
  """Equal as experiments: a field the saved config lacks (added to the code since) counts at its default."""
  try:
    as_experiment = lambda d: {k: v for k, v in config_lib.to_dict(config_lib.from_dict(Experiment, d)).items()
                               if k not in _REPORTING}
    return as_experiment(saved) == as_experiment(current)
  except (KeyError, TypeError):  # a field the code no longer has
    return False


def _claim(directory: epath.Path, config: dict, what: str) -> None:
  """Writes directory/config.json, or checks that the one there is the same config."""
  path = directory / "config.json"
  text = json.dumps(config, indent=2, sort_keys=True)
  if path.exists():
    if not _same_config(json.loads(path.read_text()), json.loads(text)):
      raise AblationError(f"{directory}: holds {what} of another config (see its config.json); use a new --workdir "
                          "or remove that folder")
    return
  directory.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def _stage_finished(workdir: epath.Path, stage) -> bool:
  return (epath.Path(layout.stage_dir(str(workdir), stage)) / "summary.json").exists()


def _train(exp: Experiment, indices: Sequence[int], workdir: epath.Path, log) -> None:
  from mm15_jax.eval import run as eval_run
  from mm15_jax.train import runner
  for i in indices:
    if _stage_finished(workdir, exp.stages[i]):
      log(f"[ablate]   stage {exp.stages[i].name}: finished earlier in {workdir}")
      continue
    log(f"[ablate]   stage {exp.stages[i].name}: training in {workdir}")
    runner.run_stage(exp, i, str(workdir), log=log, evaluate=eval_run.periodic_eval)


def run(exp: Experiment, grid: dict[str, list[str]], workdir: str, *, stages: str = "", data_dir: str = "",
        benchmarks: str | None = None, max_examples: int = 0, n_max: int | None = None, batch_size: int = 16,
        max_new_tokens: int = 24, log=print) -> list[dict]:
  """Trains and evaluates every point of `grid` under `workdir`; writes the table and plot; returns the rows."""
  from mm15_jax.eval import run as eval_run
  swept = swept_stages(exp, stages)
  check_grid(exp, grid, swept)
  grid_points = points(grid)
  root = epath.Path(workdir)
  shared_dir, last = root / "shared", exp.stages[swept[-1]]
  chain = shared_chain(exp, swept[0])
  log(f"[ablate] {len(grid_points)} points x stages {[exp.stages[i].name for i in swept]}"
      + (f"; shared: {[exp.stages[i].name for i in chain]} in {shared_dir}" if chain else ""))
  if chain:
    _claim(shared_dir, {"model": config_lib.to_dict(exp.model), "seed": exp.seed,  # Experiment-shaped
                        "stages": [config_lib.to_dict(exp.stages[i]) for i in chain]}, "shared stages")
    _train(exp, chain, shared_dir, log)
  rows = []
  for n, point in enumerate(grid_points, 1):
    point_dir = root / "points" / point.name
    report_path = point_dir / REPORT
    if report_path.exists():
      log(f"[ablate] point {n}/{len(grid_points)} {point.name}: finished earlier")
    else:
      log(f"[ablate] point {n}/{len(grid_points)} {point.name}")
      point_exp = point_experiment(exp, point, swept, shared_dir)
      _claim(point_dir, config_lib.to_dict(point_exp), "a point")
      _train(point_exp, swept, point_dir, log)
      log(f"[ablate]   evaluating {last.name} on the held-out suites")
      eval_run.evaluate_checkpoint(point_exp, layout.checkpoint_dir(str(point_dir), last),
                                   out_dir=str(point_dir / "eval"), stage=last.name, data_dir=data_dir,
                                   benchmarks=benchmarks, n_max=n_max, max_examples=max_examples,
                                   batch_size=batch_size, max_new_tokens=max_new_tokens, log=log)
    rows.append(read_row(point, point_dir, last))
    log(f"[ablate]   {point.name}: {_scores_line(rows[-1])}")
  write_outputs(rows, list(grid), root, title=f"{exp.name}: {', '.join(grid)}")
  log(f"[ablate] table: {root / 'ablation.md'}, plot: {root / 'ablation.png'}")
  return rows


def read_row(point: Point, point_dir: epath.Path, last) -> dict:
  """A point's scores from its eval report (fractions; None where absent) and its last logged training loss."""
  report = json.loads((point_dir / REPORT).read_text())
  categories = report["categories"]
  summary_path = epath.Path(point_dir) / last.name / "summary.json"
  loss = json.loads(summary_path.read_text())["loss_last"] if summary_path.exists() else None
  return {"point": point.name, "values": dict(point.values), "categories": dict(categories),
          "mean": sum(categories.values()) / len(categories) if categories else None, "mmbase": report["mmbase"],
          "benchmarks": dict(report["benchmarks"]), "loss_last": loss, "report": str(point_dir / REPORT)}


def _pct(v) -> str:
  return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _scores_line(row: dict) -> str:
  parts = [f"{c} {_pct(v)}" for c, v in row["categories"].items()]
  return ", ".join(parts + [f"mean {_pct(row['mean'])}", f"MMBase {_pct(row['mmbase'])}"])


def markdown_table(rows: Sequence[dict], keys: Sequence[str]) -> str:
  """One row per point: the grid values, category scores (%), their mean, MMBase and the final training loss."""
  categories = list(dict.fromkeys(c for r in rows for c in r["categories"]))
  header = ["point", *keys, *categories, "mean", "MMBase", "train loss"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    loss = "-" if r["loss_last"] is None else f"{r['loss_last']:.3f}"
    cells = [r["point"], *(r["values"][k] for k in keys), *(_pct(r["categories"].get(c)) for c in categories),
             _pct(r["mean"]), _pct(r["mmbase"]), loss]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n\nScores in percent on the held-out suites; mean: of the categories shown; MMBase: " \
                            "mean of General, Text-rich and Knowledge (- where one is missing).\n"


def figure(rows: Sequence[dict], *, title: str = ""):
  """Grouped bars: one group per category plus the mean (and MMBase when known), one bar per point."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  groups = list(dict.fromkeys(c for r in rows for c in r["categories"])) + ["mean"]
  if any(r["mmbase"] is not None for r in rows):
    groups.append("MMBase")
  value = lambda r, g: r["mean"] if g == "mean" else r["mmbase"] if g == "MMBase" else r["categories"].get(g)
  fig = Figure(figsize=(max(5.0, 1.2 * len(groups) * max(1, len(rows)) / 2 + 2), 3.8), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  width = 0.8 / max(1, len(rows))
  for i, r in enumerate(rows):
    xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
    ys = [value(r, g) for g in groups]
    shown = [(x, 100 * y) for x, y in zip(xs, ys) if y is not None]
    bars = ax.bar([x for x, _ in shown], [y for _, y in shown], width, label=r["point"])
    ax.bar_label(bars, fmt="%.1f", fontsize=6)
  ax.set_xticks(range(len(groups)))
  ax.set_xticklabels(groups, fontsize=8)
  ax.set_ylabel("score (%)")
  ax.legend(fontsize=7)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return fig


def write_outputs(rows: Sequence[dict], keys: Sequence[str], root: epath.Path, *, title: str = "") -> None:
  """ablation.md, ablation.json and ablation.png in `root`."""
  root.mkdir(parents=True, exist_ok=True)
  (root / "ablation.md").write_text(markdown_table(rows, keys))
  (root / "ablation.json").write_text(json.dumps({"grid": list(keys), "points": list(rows)}, indent=2) + "\n")
  with (root / "ablation.png").open("wb") as f:
    figure(rows, title=title).savefig(f, format="png")


def command(a, load_experiment) -> None:
  """The `mm15 ablate` command: every error a user can cause is one line."""
  try:
    grid = parse_grid(a.grid)
    exp = load_experiment(a.config, a.arg, a.set)
    rows = run(exp, grid, a.workdir, stages=a.stage, data_dir=a.data_dir, benchmarks=a.benchmarks or None,
               max_examples=a.max_examples, n_max=a.n_max or None, batch_size=a.batch_size,
               max_new_tokens=a.max_new_tokens)
  except AblationError as e:
    raise SystemExit(str(e)) from None
  print(markdown_table(rows, list(grid)))
