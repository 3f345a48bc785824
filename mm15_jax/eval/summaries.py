"""Benchmark-level scores from per-example ones: the mean, or the official aggregate of MME and POPE.

`summarize(metric, records, scores, predictions)` -> {"score": in [0, 1], "details": {...}}. The score is what
category averages use; details hold the numbers the benchmark's own tables report:
  - every metric: per "subset" means when the records carry one (a subtask, a split);
  - mme: per subtask acc and acc+ (percent) and their sum, the perception / cognition / total sums (MME's
    eval_tool/calculation.py; a subtask scores at most 200); the score is total / (200 x subtasks present);
  - anls: the exact-match rate beside it ("exact");
  - pope: per split accuracy, precision, recall, F1 and yes-ratio, "yes" being the positive class (POPE's
    evaluate.py); the score is the mean F1 over the splits.
"""
from __future__ import annotations

import collections
from typing import Sequence

from mm15_jax.eval import metrics

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def _by_subset(records: Sequence[dict], values: Sequence) -> dict[str, list]:
  groups: dict[str, list] = collections.defaultdict(list)
  for record, value in zip(records, values):
    groups[str(record.get("subset", ""))].append(value)
  return dict(sorted(groups.items()))


def mean_summary(records: Sequence[dict], scores: Sequence[float]) -> dict:
  details = {}
  subsets = _by_subset(records, scores)
  if len(subsets) > 1 or "" not in subsets:
    details["subsets"] = {name: sum(v) / len(v) for name, v in subsets.items()}
  return {"score": sum(scores) / len(scores), "details": details}


def mme_summary(records: Sequence[dict], scores: Sequence[float]) -> dict:
  """acc: share of right answers; acc+: share of images whose questions (a "Yes" and a "No") are all right."""
  subtasks = {}
  for name, items in _by_subset(records, list(zip(records, scores))).items():
    if not name:
      raise ValueError("mme: a record has no 'subset' (its subtask); import MME with `mm15 eval import --format mme`")
    per_image: dict[str, list[float]] = collections.defaultdict(list)
    for record, score in items:
      per_image[str(record.get("group", id(record)))].append(score)
    acc = 100.0 * sum(s for _, s in items) / len(items)
    acc_plus = 100.0 * sum(all(s == 1.0 for s in v) for v in per_image.values()) / len(per_image)
    subtasks[name] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
  perception = sum(v["score"] for k, v in subtasks.items() if k in MME_PERCEPTION)
  cognition = sum(v["score"] for k, v in subtasks.items() if k in MME_COGNITION)
  total = sum(v["score"] for v in subtasks.values())
  return {"score": total / (200.0 * len(subtasks)),
          "details": {"subtasks": subtasks, "perception": perception, "cognition": cognition, "total": total}}


def binary_scores(predicted_yes: Sequence[bool], label_yes: Sequence[bool]) -> dict[str, float]:
  """Accuracy, precision, recall, F1 and yes-ratio with "yes" the positive class (0 where a ratio is 0 / 0)."""
  tp = sum(p and l for p, l in zip(predicted_yes, label_yes))
  fp = sum(p and not l for p, l in zip(predicted_yes, label_yes))
  fn = sum(l and not p for p, l in zip(predicted_yes, label_yes))
  tn = len(label_yes) - tp - fp - fn
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"accuracy": (tp + tn) / len(label_yes), "precision": precision, "recall": recall, "f1": f1,
          "yes_ratio": (tp + fp) / len(label_yes)}


def pope_summary(records: Sequence[dict], predictions: Sequence[str]) -> dict:
  splits = {}
  pairs = [(metrics.pope_label(p) == "yes", r["answers"][0].strip().lower() == "yes")
           for p, r in zip(predictions, records)]
  for name, items in _by_subset(records, pairs).items():
    splits[name or "all"] = binary_scores([p for p, _ in items], [l for _, l in items])
  return {"score": sum(s["f1"] for s in splits.values()) / len(splits), "details": {"splits": splits}}


def summarize(metric: str, records: Sequence[dict], scores: Sequence[float], predictions: Sequence[str]) -> dict:
  """The benchmark's score and details (module docstring) from its records and per-example scores."""
  if not records or len(records) != len(scores) or len(records) != len(predictions):
    raise ValueError(f"summarize: {len(records)} records, {len(scores)} scores, {len(predictions)} predictions")
  if metric == "mme":
    return mme_summary(records, scores)
  if metric == "pope":
    return pope_summary(records, predictions)
  summary = mean_summary(records, scores)
  if metric == "anls":  # element OCR reports exact match beside ANLS
    summary["details"]["exact"] = sum(
        metrics.exact_match(p, r["answers"]) for p, r in zip(predictions, records)) / len(records)
  return summary
