"""UI evaluation: CIDEr-D against hand-computed values, per-task metrics, the UI category."""
import math

import pytest

from mm15_jax.eval import metrics, report, suites, summaries


def test_cider_d_matches_hand_computed_values():
  # Two examples, one reference each: N = 2 documents, so an n-gram in one reference has idf log(2) - log(1).
  # An exact match has cosine 1 for unigrams and bigrams and no 3- or 4-grams: (1 + 1 + 0 + 0) / 4 x 10 = 5.
  assert metrics.cider_d(["a b", "x y"], [["a b"], ["c d"]]) == pytest.approx([5.0, 0.0])
  # "a" against "a b": unigram vectors (log2) and (log2, log2): cosine 1/sqrt(2), length penalty
  # exp(-(1 - 2)^2 / (2 * 6^2)); no bigram in the candidate.
  expected = (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 * 10
  assert metrics.cider_d(["a", "c d"], [["a b"], ["c d"]]) == pytest.approx([expected, 5.0])
  # Scores against several references are averaged; "c", "d" and "c d" are in the references of both examples,
  # so their idf is log(2) - log(2) = 0: "a b" scores 5 against "a b" and 0 against "c d" (mean 2.5), and the
  # exact match "c d" scores 0.
  assert metrics.cider_d(["a b", "c d"], [["a b", "c d"], ["c d"]]) == pytest.approx([2.5, 0.0])
  # Tokenisation: case and punctuation do not count.
  assert metrics.cider_d(["A, B.", "x y"], [["a b"], ["c d"]]) == pytest.approx([5.0, 0.0])
  assert metrics.caption_tokens('The "Wi-Fi" switch is ON, isn\'t it?') == "the wi-fi switch is on isn't it"


def test_cider_d_is_a_corpus_metric():
  with pytest.raises(ValueError, match="corpus_scores"):
    metrics.score("cider", "a b", ["a b"])
  with pytest.raises(ValueError, match="references"):
    metrics.cider_d(["a"], [[]])
  preds, refs = ["a b", "x y"], [["a b"], ["c d"]]
  assert metrics.corpus_scores("cider", preds, refs) == pytest.approx([5.0, 0.0])
  assert metrics.mean_score("cider", preds, refs) == pytest.approx(2.5)
  assert metrics.corpus_scores("exact", ["Tab", "x"], [["tab"], ["y"]]) == [1.0, 0.0]


def test_element_ocr_reports_exact_match_beside_anls():
  recs = [{"answers": ["Sign in"]}, {"answers": ["Settings"]}]
  preds = ["sign in", "Setings"]
  scores = metrics.corpus_scores("anls", preds, [r["answers"] for r in recs])
  summary = summaries.summarize("anls", recs, scores, preds)
  assert summary["score"] == pytest.approx((1.0 + (1 - 1 / 8)) / 2)
  assert summary["details"]["exact"] == 0.5


def test_ui_category():
  assert suites.paper_category("ui", "x") == "UI" and suites.record_category("UI") == "ui"
  b = suites.Benchmark("ui_describe", "UI", "cider", suites.RecordsSource("/nowhere", "ui_describe"))
  table = suites.category_table([b])
  assert table["UI"] == ["ui_describe"]
  built = report.build_report({"ui_describe": 80.0, "ui_ground": 40.0}, table)
  assert built["categories"] == {"UI": 80.0} and built["uncategorised"] == ["ui_ground"]
  assert report.category_averages({"ui_ocr": 50.0, "ui_ground": 30.0}, report.HELDOUT_CATEGORIES) == {"UI": 40.0}
