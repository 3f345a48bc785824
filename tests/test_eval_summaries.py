"""Benchmark-level scores: MME's acc / acc+ per subtask and summed score, POPE's per-split F1, subset means."""
import pytest

from mm15_jax.eval import metrics, summaries


def _mme(subtask, image, answer):
  return {"subset": subtask, "group": f"{subtask}/{image}", "answers": [answer]}


def test_mme_acc_and_acc_plus():
  # MME eval_tool/calculation.py: acc = right questions / questions, acc+ = images with both questions right /
  # images, each x100; a subtask scores acc + acc+; perception and cognition sum their subtasks.
  recs = [_mme("existence", "a", "Yes"), _mme("existence", "a", "No"), _mme("existence", "b", "Yes"),
          _mme("existence", "b", "No"), _mme("code_reasoning", "c", "Yes"), _mme("code_reasoning", "c", "No")]
  preds = ["yes", "no", "yes", "yes", "no", "No"]
  scores = [metrics.score("mme", p, r["answers"]) for p, r in zip(preds, recs)]
  got = summaries.summarize("mme", recs, scores, preds)
  existence = got["details"]["subtasks"]["existence"]
  assert existence == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
  assert got["details"]["subtasks"]["code_reasoning"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
  assert got["details"]["perception"] == 125.0 and got["details"]["cognition"] == 50.0
  assert got["details"]["total"] == 175.0 and got["score"] == pytest.approx(175.0 / 400.0)


def test_mme_needs_subtasks():
  with pytest.raises(ValueError, match="subset"):
    summaries.summarize("mme", [{"answers": ["Yes"]}], [1.0], ["yes"])


def test_pope_per_split():
  # POPE evaluate.py: "yes" is the positive class; precision TP/(TP+FP), recall TP/(TP+FN), F1, accuracy.
  labels = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
  preds = ["Yes", "yes", "No", "yes", "no", "There is no dog.", "no", "Yes"]
  recs = [{"subset": "random" if i < 6 else "adversarial", "answers": [l]} for i, l in enumerate(labels)]
  scores = [metrics.score("pope", p, r["answers"]) for p, r in zip(preds, recs)]
  got = summaries.summarize("pope", recs, scores, preds)
  random = got["details"]["splits"]["random"]  # TP 2, FN 1, FP 1, TN 2
  assert random["precision"] == pytest.approx(2 / 3) and random["recall"] == pytest.approx(2 / 3)
  assert random["f1"] == pytest.approx(2 / 3) and random["accuracy"] == pytest.approx(4 / 6)
  assert random["yes_ratio"] == pytest.approx(3 / 6)
  adversarial = got["details"]["splits"]["adversarial"]  # TP 1, TN 1
  assert adversarial == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5}
  assert got["score"] == pytest.approx((2 / 3 + 1.0) / 2)  # mean F1 over the splits


def test_pope_no_positive_prediction():
  got = summaries.binary_scores([False, False], [True, False])
  assert got == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}


def test_mean_with_subsets():
  recs = [{"subset": "count"}, {"subset": "count"}, {"subset": "order"}]
  got = summaries.summarize("mc", recs, [1.0, 0.0, 1.0], ["A", "B", "C"])
  assert got["score"] == pytest.approx(2 / 3) and got["details"] == {"subsets": {"count": 0.5, "order": 1.0}}
  assert summaries.summarize("exact", [{}, {}], [1.0, 0.0], ["a", "b"]) == {"score": 0.5, "details": {}}
