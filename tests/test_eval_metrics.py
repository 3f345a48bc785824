"""Each metric against cases worked out by hand from its definition."""
import itertools

import pytest

from mm15_jax.eval import metrics as M


# --- VQA accuracy ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, normalised", [
    ("Two dogs.", "2 dogs"),  # number word -> digit, final period dropped
    ("The cat", "cat"),  # articles removed, lower case
    ("an apple a day", "apple day"),
    ("1,000", "1000"),  # a digit,digit comma makes every punctuation mark vanish
    ("1,000 (approx)", "1000 approx"),
    ("red, white", "red white"),  # "p " present: the comma is deleted
    ("red,white", "red white"),  # otherwise it becomes a space
    ("e-mail", "e mail"),
    ("3.5", "3.5"),  # a period before a digit stays
    ("dont", "don't"),  # contractions table
    ("yes!", "yes"),
    ("  ten\tyears\n", "10 years"),
    ("none", "0"),
    ("It's 10:30 a.m.", "it's 10:30 am"),  # apostrophes and colons are not punctuation there
])
def test_vqa_normalisation(raw, normalised):
  assert M.normalize_vqa_answer(raw) == normalised


def _vqa_by_subsets(pred, refs):
  """The official form written out: mean over the 10-choose-9 subsets of min(#matches / 3, 1)."""
  subsets = list(itertools.combinations(range(len(refs)), len(refs) - 1))
  return sum(min(1.0, sum(refs[i] == pred for i in s) / 3) for s in subsets) / len(subsets)


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_annotators(k, expected):
  refs = ["blue"] * k + ["green"] * (10 - k)
  assert M.vqa_accuracy("blue", refs) == pytest.approx(expected)
  assert M.vqa_accuracy("blue", refs) == pytest.approx(_vqa_by_subsets("blue", refs))


def test_vqa_accuracy_normalises_prediction_and_references():
  refs = ["2", "2", "two"] + ["3"] * 7
  assert M.vqa_accuracy("Two.", refs) == pytest.approx(0.9)
  assert M.vqa_accuracy("The 3", refs) == pytest.approx(1.0)
  assert M.vqa_accuracy("yes", ["Yes"] * 10) == 1.0
  assert M.vqa_accuracy("no", ["yes"] * 10) == 0.0


def test_vqa_accuracy_short_reference_lists():
  assert M.vqa_accuracy("Cat", ["the cat"]) == 1.0
  assert M.vqa_accuracy("dog", ["the cat"]) == 0.0
  # Two references: one match needed among the other; leaving out "red" leaves none, leaving out "blue" one.
  assert M.vqa_accuracy("red", ["red", "blue"]) == pytest.approx(0.5)
  assert M.vqa_accuracy("red", ["red", "red"]) == 1.0
  # Four references need three matching others, exactly the official rule.
  assert M.vqa_accuracy("red", ["red"] * 3 + ["blue"]) == pytest.approx((3 * 2 / 3 + 1) / 4)
  with pytest.raises(ValueError):
    M.vqa_accuracy("red", [])


# --- ANLS -----------------------------------------------------------------------------------------------------

def test_levenshtein():
  assert M.levenshtein("kitten", "sitting") == 3
  assert M.levenshtein("", "abc") == 3
  assert M.levenshtein("flaw", "lawn") == 2
  assert M.levenshtein("same", "same") == 0


def test_anls():
  assert M.anls("  HeLLo ", ["hello"]) == 1.0
  assert M.anls("abce", ["abcd"]) == pytest.approx(0.75)
  assert M.anls("abcxy", ["abcde"]) == pytest.approx(0.6)  # NL 0.4
  assert M.anls("hello", ["xyz", "hellp"]) == pytest.approx(0.8)  # best reference
  assert M.anls("", [""]) == 1.0


def test_anls_threshold_edge():
  # The scoring script zeroes a question only when 1 - NL < 0.5: NL exactly 0.5 keeps 0.5.
  assert M.anls("abxy", ["abcd"]) == 0.5
  assert M.anls("ac", ["ab"]) == 0.5
  assert M.anls("abxyz", ["abcde"]) == 0.0  # NL 0.6
  assert M.anls("abcdxyz", ["abcdefg"]) == pytest.approx(4 / 7)  # NL 3/7 < 0.5 keeps its score
  assert M.anls("completely different", ["x"]) == 0.0


# Cases from the official DocVQA / InfographicVQA scoring script (infographicsvqa_eval.py, Robust Reading
# Competition, docvqa.org): anls_compute(gt, det) lower-cases, strips and joins whitespace runs with one space
# (' '.join(s.strip().lower().split())) before the edit distance, and divides by max(len(gt), len(det)) of the
# strings as given; a question scores 1 - min NL, set to 0 when below the 0.5 threshold.
@pytest.mark.parametrize("pred, ref, expected", [
    ("new  york", "New York", 1.0),  # a run of spaces is one space
    ("New\tYork\n", "new york", 1.0),  # tabs and newlines too
    ("  12 /15 / 89", "12/15/89", 1 - 3 / 13),  # distance 3 on the collapsed "12 /15 / 89", length 13 as given
    ("Dear dr.  Lobo", "Dear Dr. Lobo", 1.0),
    ("12/15/88", "12/15/89", 1 - 1 / 8),
])
def test_anls_official_script(pred, ref, expected):
  assert M.anls(pred, [ref]) == pytest.approx(expected)


# --- ChartQA relaxed accuracy ---------------------------------------------------------------------------------

def test_parse_number():
  # Pix2Struct's _to_float (pix2struct/metrics.py): float(text), or float(text.rstrip("%")) / 100.0.
  assert M.parse_number(" 12 ") == 12.0
  assert M.parse_number("-3.5") == -3.5
  assert M.parse_number("45%") == 45 / 100.0
  assert M.parse_number("35%") == 35 / 100.0 != 35 * 0.01  # the division, not a multiplication by 0.01
  assert M.parse_number("1e3") == 1000.0
  assert M.parse_number("1_000") == 1000.0  # Python's float() reads it
  assert M.parse_number("1,000") is None
  assert M.parse_number("12 apples") is None


@pytest.mark.parametrize("pred, ref, expected", [
    ("105", "100", 1.0), ("95", "100", 1.0),  # exactly 5%: inclusive
    ("105.01", "100", 0.0), ("94.9", "100", 0.0),
    ("21", "20", 1.0), ("21.1", "20", 0.0),
    ("-10", "-10.4", 1.0),
    ("45%", "0.45", 1.0), ("45%", "45", 0.0),  # "%" divides by 100, as in the official code
    ("Yes", "yes", 1.0), ("Bar A", "bar b", 0.0),
    ("0", "0", 1.0), ("0.0", "0", 0.0),  # a zero reference needs an exact match
    ("1,000", "1000", 0.0),
    ("abc", "100", 0.0),
])
def test_relaxed_accuracy(pred, ref, expected):
  assert M.relaxed_accuracy(pred, [ref]) == expected


@pytest.mark.parametrize("pred, ref, expected", [
    # Pix2Struct's relaxed_correctness, where the percentage is divided by 100: 0.3675 vs 35 / 100 = 0.35 is a
    # relative change of 0.05000000000000004 (> 0.05, wrong); with 35 * 0.01 = 0.35000000000000003 it was 0.0499...
    ("0.3675", "35%", 0.0), ("0.3325", "35%", 1.0), ("36.75%", "35%", 0.0), ("9.45%", "9%", 1.0),
    ("nan", "nan", 0.0),  # float("nan") parses; NaN is never within 5%, and no string match is tried
])
def test_relaxed_accuracy_pix2struct_percentages(pred, ref, expected):
  assert M.relaxed_accuracy(pred, [ref]) == expected


def test_relaxed_accuracy_any_reference():
  assert M.relaxed_accuracy("50", ["red", "52"]) == 1.0


# --- exact match and multiple choice --------------------------------------------------------------------------

def test_exact_match():
  assert M.exact_match("  New   York ", ["boston", "new york"]) == 1.0
  assert M.exact_match("new-york", ["new york"]) == 0.0
  assert M.exact_match("New York.", ["new york"]) == 0.0


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("B)", "B"),
    ("The answer is B", "B"), ("The answer is B.", "B"), ("Answer: (C)", "C"), ("Option D", "D"),
    ("B. a cat", "B"), ("(C) red", "C"), ("I think it is (D) here", "D"),
    ("answer is a dog", None), ("The answer is Blue", None), ("I answered A", None), ("nothing", None), ("", None),
])
def test_extract_option_letter(text, letter):
  assert M.extract_option_letter(text) == letter


def test_multiple_choice_accuracy():
  assert M.multiple_choice_accuracy("The answer is (B).", ["B"]) == 1.0
  assert M.multiple_choice_accuracy("C", ["(B) a cat"]) == 0.0
  assert M.multiple_choice_accuracy("no idea", ["B"]) == 0.0
  with pytest.raises(ValueError, match="no option letter"):
    M.multiple_choice_accuracy("B", ["a cat"])


# --- grounding ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, box", [
    ("[100, 200, 300, 400]", (100, 200, 300, 400)),
    ("the dog [100,200,300,400] sits", (100, 200, 300, 400)),
    ("[ 100 ,200 , 300,400 ]", (100, 200, 300, 400)),
    ("[-20, 10, 300, 1200]", (0, 10, 300, 1000)),  # clipped to the grid
    ("[10.5, 20, 30, 40]", (10.5, 20, 30, 40)),
    ("[1, 2, 3, 4] and [5, 6, 7, 8]", (1, 2, 3, 4)),  # the first one
    ("[12, abc, 3, 4]", None), ("[1, 2, 3]", None), ("[1, 2, 3, 4", None), ("no box", None), ("[]", None),
])
def test_parse_box(text, box):
  assert M.parse_box(text) == box


def test_parse_boxes_and_points():
  assert M.parse_boxes("[1, 2, 3, 4] then [5,6,7,8]") == [(1, 2, 3, 4), (5, 6, 7, 8)]
  assert M.parse_point("at [250, 750].") == (250, 750)
  assert M.parse_point("[1, 2, 3, 4]") is None
  assert M.parse_point("[-5, 2000]") == (0, 1000)


def test_box_iou():
  a = (0, 0, 100, 100)
  assert M.box_iou(a, a) == 1.0
  assert M.box_iou(a, (200, 200, 300, 300)) == 0.0  # disjoint
  assert M.box_iou(a, (100, 0, 200, 100)) == 0.0  # sharing an edge only
  assert M.box_iou(a, (50, 0, 150, 100)) == pytest.approx(5000 / 15000)
  assert M.box_iou(a, (50, 50, 150, 150)) == pytest.approx(2500 / 17500)
  assert M.box_iou(a, (0, 0, 100, 50)) == pytest.approx(0.5)  # contained half
  assert M.box_iou((10, 10, 10, 10), (10, 10, 10, 10)) == 0.0  # empty union
  assert M.box_iou((100, 100, 0, 0), a) == 0.0  # an inverted box is empty


def test_grounding_accuracy():
  ref = ["[0, 0, 100, 100]"]
  assert M.grounding_accuracy("[0, 0, 100, 100]", ref) == 1.0
  assert M.grounding_accuracy("It is at [0, 0, 100, 50].", ref) == 1.0  # IoU exactly 0.5 counts
  assert M.grounding_accuracy("[0, 0, 100, 49]", ref) == 0.0  # IoU 0.49
  assert M.grounding_accuracy("[50, 0, 150, 100]", ref) == 0.0  # IoU 1/3
  assert M.grounding_accuracy("[50, 0, 150, 100]", ref + ["[40, 0, 140, 100]"]) == 1.0  # any reference
  assert M.grounding_accuracy("somewhere on the left", ref) == 0.0
  assert M.grounding_accuracy("[0, zero, 100, 100]", ref) == 0.0


def test_grounding_points():
  ref = ["[100, 100, 200, 300]"]
  assert M.point_in_box((150, 200), (100, 100, 200, 300))
  assert M.grounding_accuracy("[150, 200]", ref) == 1.0
  assert M.grounding_accuracy("[200, 300]", ref) == 1.0  # on the corner
  assert M.grounding_accuracy("[201, 200]", ref) == 0.0
  assert M.grounding_accuracy("[150, 200] not [0, 0, 10, 10]", ref) == 1.0  # the first location counts
  assert M.grounding_accuracy("[0, 0, 10, 10] not [150, 200]", ref) == 0.0
  with pytest.raises(ValueError, match="holds no"):
    M.grounding_accuracy("[150, 200]", ["[150, 200]"])


# --- dispatch -------------------------------------------------------------------------------------------------

def test_score_dispatch():
  assert M.score("exact", "Paris", ["paris"]) == 1.0
  assert M.score("vqa", "two", ["2"] * 10) == 1.0
  assert M.score("anls", "abce", ["abcd"]) == pytest.approx(0.75)
  assert M.score("relaxed", "104", ["100"]) == 1.0
  assert M.score("iou", "[0, 0, 100, 100]", ["[0, 0, 100, 100]"]) == 1.0
  assert M.score("mc", "(A)", ["A"]) == 1.0
  with pytest.raises(ValueError, match="'bleu'"):
    M.score("bleu", "x", ["x"])
  with pytest.raises(ValueError, match="list of strings"):
    M.score("exact", "x", "x")


def test_mean_score():
  assert M.mean_score("exact", ["a", "b", "c", "d"], [["a"], ["x"], ["c"], ["y", "d"]]) == 0.75
  with pytest.raises(ValueError):
    M.mean_score("exact", ["a"], [])


# --- MME and POPE -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, label", [
    # MME eval_tool/calculation.py parse_pred_ans on the lower-cased answer: the whole answer, else "yes" / "no"
    # within its first 4 characters, "yes" tried first.
    ("Yes", "yes"), ("no", "no"), ("Yes, there is a dog.", "yes"), ("No.", "no"), ("Not at all", "no"),
    ("The answer is yes", "other"), ("nope", "no"), ("I think so", "other"), ("a no", "no"),
])
def test_mme_label(text, label):
  assert M.mme_label(text) == label


@pytest.mark.parametrize("text, label", [
    # POPE evaluate.py: first sentence (split at "."), commas removed, "no" when a space-separated word is "No",
    # "no" or "not", else "yes" (so anything else, even an unrelated answer, reads as yes).
    ("No", "no"), ("Yes", "yes"), ("There is not a dog.", "no"), ("Yes. There is no cat.", "yes"),
    ("No, there is none", "no"), ("NO", "yes"), ("Nope", "yes"), ("a cat", "yes"),
])
def test_pope_label(text, label):
  assert M.pope_label(text) == label


def test_yes_no_metrics():
  assert M.score("mme", "Yes, it is", ["Yes"]) == 1.0 and M.score("mme", "maybe", ["No"]) == 0.0
  assert M.score("pope", "There is no dog.", ["no"]) == 1.0 and M.score("pope", "NO", ["no"]) == 0.0
  with pytest.raises(ValueError, match="'yes' or 'no'"):
    M.score("pope", "yes", ["a cat"])
