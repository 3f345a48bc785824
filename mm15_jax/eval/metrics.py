"""Per-sample benchmark metrics, each following its benchmark's official definition. Pure Python.

Every metric maps (prediction text, reference answers) to a score in [0, 1]; `score` dispatches on the metric
name stored in held-out records ("exact" | "vqa" | "anls" | "relaxed" | "iou" | "mc" | "mme" | "pope"). CIDEr-D
("cider", UI screen descriptions) weighs n-grams by their frequency over the whole benchmark, so its per-example
scores come from `corpus_scores`, and range over 0..10. Scores over a whole benchmark (MME's acc+, POPE's F1) are
in summaries.py.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

Box = tuple[float, float, float, float]  # (x1, y1, x2, y2) on the 0..1000 grid of the whole image
Point = tuple[float, float]  # (x, y) on the same grid

# ---------------------------------------------------------------------------------------------------------------
# VQA accuracy (VQAv2 / TextVQA): answer normalisation of the official VQA evaluation script (vqaEval.py).

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # verbatim from vqaEval.py; its capitalised keys never match after lower-casing there either
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# vqaEval.py writes "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a lookahead that never fires, so in effect a period
# is dropped unless a digit follows it ("3.5" keeps its point, "dog." loses its full stop).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _process_punctuation(text: str) -> str:
  out = text
  # A "1,000"-style number anywhere makes the script delete every punctuation mark instead of spacing it.
  glue = _DIGIT_COMMA_DIGIT.search(text) is not None
  for p in _PUNCTUATION:
    if glue or p + " " in text or " " + p in text:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _process_digit_article(text: str) -> str:
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in _ARTICLES]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
  """Official VQA normalisation: whitespace, punctuation, number words -> digits, articles, contractions."""
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """VQA accuracy: mean over the leave-one-out subsets of the references of min(#matches / 3, 1).

  With the usual 10 human answers this is the official average over the 10 choose 9 subsets. Unlike vqaEval.py,
  which skips normalisation when all references are identical, prediction and references are always normalised
  (as the EvalAI answer processor used for TextVQA does). Fewer references: the 3 matches needed become
  min(3, n - 1), and a single reference is a normalised exact match, so a correct answer can still score 1.
  """
  if not answers:
    raise ValueError("vqa_accuracy needs at least one reference answer")
  pred = normalize_vqa_answer(prediction)
  refs = [normalize_vqa_answer(a) for a in answers]
  if len(refs) == 1:
    return float(pred == refs[0])
  needed = min(3, len(refs) - 1)
  matches = sum(r == pred for r in refs)
  # Leaving out a matching reference leaves matches - 1 among the others; leaving out another leaves matches.
  per_subset = [min(1.0, (matches - (r == pred)) / needed) for r in refs]
  return sum(per_subset) / len(per_subset)


# ---------------------------------------------------------------------------------------------------------------
# ANLS (DocVQA / InfoVQA).

def levenshtein(a: str, b: str) -> int:
  """Edit distance (insertions, deletions, substitutions, each cost 1)."""
  if len(a) < len(b):
    a, b = b, a
  previous = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    current = [i]
    for j, cb in enumerate(b, 1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
    previous = current
  return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
  """Average Normalised Levenshtein Similarity of one question, as the official DocVQA / InfographicVQA scoring
  script (infographicsvqa_eval.py of the Robust Reading Competition, docvqa.org) computes it.

  Both strings are lower-cased, stripped and their runs of whitespace collapsed to one space before the edit
  distance; NL = distance / the longer of the two strings as given (the script measures the strings before
  collapsing). The question scores 1 - min NL over the references, and 0 when that is below `threshold`: an NL of
  exactly 0.5 keeps its 0.5 (the script's `< threshold` cut; Biten et al., 2019 write NL >= 0.5 -> 0).
  """
  if not answers:
    raise ValueError("anls needs at least one reference answer")
  pred = collapse_whitespace(prediction.lower())
  distances = []
  for answer in answers:
    longest = max(len(answer.upper()), len(prediction.upper()))  # the script's lengths, "ß".upper() included
    distances.append(levenshtein(collapse_whitespace(answer.lower()), pred) / longest if longest else 0.0)
  best = 1.0 - min(distances)
  return 0.0 if best < threshold else best


def collapse_whitespace(text: str) -> str:
  return " ".join(text.split())


# ---------------------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy (the pix2struct / ChartQA definition).

def parse_number(text: str) -> float | None:
  """A number as Pix2Struct's `_to_float` reads it (pix2struct/metrics.py): Python's float() of the text, where a
  trailing "%" is stripped and the value divided by 100 ("45%" -> 45 / 100). Unparsable text -> None."""
  try:
    if text.endswith("%"):
      return float(text.rstrip("%")) / 100.0
    return float(text)
  except ValueError:
    return None


def relaxed_accuracy(prediction: str, answers: Sequence[str], max_relative_change: float = 0.05) -> float:
  """1 when some reference matches: numbers within 5% relative error (inclusive), otherwise case-insensitive equal.

  Pix2Struct's `relaxed_correctness` (pix2struct/metrics.py, the ChartQA metric of Masry et al., 2022): a reference
  of 0 (or one that is no number) needs an exact string match. Prediction and references are stripped first.
  """
  if not answers:
    raise ValueError("relaxed_accuracy needs at least one reference answer")
  pred = prediction.strip()
  pred_number = parse_number(pred)
  for answer in answers:
    ref = answer.strip()
    ref_number = parse_number(ref)
    if pred_number is not None and ref_number:
      if abs(pred_number - ref_number) / abs(ref_number) <= max_relative_change:
        return 1.0
    elif pred.lower() == ref.lower():
      return 1.0
  return 0.0


# ---------------------------------------------------------------------------------------------------------------
# Exact match and multiple choice.

def normalize_whitespace_case(text: str) -> str:
  return " ".join(text.lower().split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
  """1 when the prediction equals some reference after lower-casing and collapsing whitespace."""
  if not answers:
    raise ValueError("exact_match needs at least one reference answer")
  pred = normalize_whitespace_case(prediction)
  return float(any(pred == normalize_whitespace_case(a) for a in answers))


# Tried in order; the first that matches gives the option letter.
_OPTION_PATTERNS = (
    re.compile(r"\(?([A-Za-z])\)?[.:)]?"),  # the whole answer is a letter: "B", "(b)", "B."
    re.compile(r"\b(?i:answer|option|choice)\b\s*(?:(?i:is)\s*)?:?\s*\(?([A-Z])\)?(?![A-Za-z])"),  # "The answer is B"
    re.compile(r"\(?([A-Z])[.:)]\s"),  # leads with a labelled option: "B. a cat", "(C) red"
    re.compile(r"\(([A-Z])\)"),  # a parenthesised letter anywhere: "it is (D)"
)


def extract_option_letter(text: str) -> str | None:
  """The option letter (upper case) a free-form answer chooses, or None."""
  text = text.strip()
  whole = _OPTION_PATTERNS[0].fullmatch(text)
  if whole:
    return whole.group(1).upper()
  for pattern, anchored in zip(_OPTION_PATTERNS[1:], (False, True, False)):
    found = pattern.match(text + " ") if anchored else pattern.search(text)
    if found:
      return found.group(1)
  return None


def _parse_references(answers: Sequence[str], parse: Callable[[str], Any], metric: str, kind: str,
                      lacks: str) -> list:
  """Every reference parsed; an empty list or an unparsable reference is an error (a dataset bug, not a miss)."""
  if not answers:
    raise ValueError(f"{metric} needs at least one reference answer")
  refs = [parse(answer) for answer in answers]
  for answer, ref in zip(answers, refs):
    if ref is None:
      raise ValueError(f"{kind} reference {answer!r} {lacks}")
  return refs


def multiple_choice_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """1 when the letter chosen in the prediction is the reference's letter; no letter found scores 0."""
  refs = _parse_references(answers, extract_option_letter, "multiple_choice_accuracy", "multiple-choice",
                           "names no option letter")
  chosen = extract_option_letter(prediction)
  return float(chosen is not None and chosen in refs)


# ---------------------------------------------------------------------------------------------------------------
# Yes/no benchmarks: MME and POPE, each with its official reading of a free-form answer.

def mme_label(text: str) -> str:
  """"yes", "no" or "other", as MME's eval_tool/calculation.py `parse_pred_ans` reads a lower-cased answer: the
  whole answer, else "yes" / "no" within its first 4 characters ("yes" first)."""
  text = text.strip().lower()
  if text in ("yes", "no"):
    return text
  head = text[:4]
  return "yes" if "yes" in head else "no" if "no" in head else "other"


def pope_label(text: str) -> str:
  """"yes" or "no", as POPE's evaluate.py reads an answer: its first sentence (up to the first "."), commas
  removed, is "no" when one of its space-separated words is "No", "no" or "not", else "yes"."""
  sentence = text.split(".")[0].replace(",", "")
  words = sentence.split(" ")
  return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _yes_no_references(answers: Sequence[str], metric: str) -> list[str]:
  refs = [a.strip().lower() for a in answers]
  if not refs or any(r not in ("yes", "no") for r in refs):
    raise ValueError(f"{metric} references must be 'yes' or 'no', got {list(answers)!r}")
  return refs


def mme_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """1 when MME's reading of the prediction is the reference ("Yes" / "No"); "other" scores 0."""
  return float(mme_label(prediction) in _yes_no_references(answers, "mme"))


def pope_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """1 when POPE's reading of the prediction is the reference ("yes" / "no")."""
  return float(pope_label(prediction) in _yes_no_references(answers, "pope"))


# ---------------------------------------------------------------------------------------------------------------
# Referring and grounding: "[x1, y1, x2, y2]" boxes and "[x, y]" points on the 0..1000 grid of the whole image.

_COORD = r"\s*([+-]?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(r"\[" + ",".join([_COORD] * 4) + r"\]")
_POINT = re.compile(r"\[" + ",".join([_COORD] * 2) + r"\]")
GRID = 1000.0


def _clip(v: str) -> float:
  # Coordinates past the image edge (e.g. -5) mean the edge itself.
  return min(max(float(v), 0.0), GRID)


def parse_boxes(text: str) -> list[Box]:
  """Every "[x1, y1, x2, y2]" in the text, in order, coordinates clipped to the 0..1000 grid."""
  return [tuple(_clip(v) for v in m.groups()) for m in _BOX.finditer(text)]


def parse_box(text: str) -> Box | None:
  boxes = parse_boxes(text)
  return boxes[0] if boxes else None


def parse_point(text: str) -> Point | None:
  """The first "[x, y]" in the text, clipped to the grid, or None."""
  m = _POINT.search(text)
  return (_clip(m.group(1)), _clip(m.group(2))) if m else None


def box_area(box: Box) -> float:
  x1, y1, x2, y2 = box
  return max(0.0, x2 - x1) * max(0.0, y2 - y1)  # an inverted box (x2 < x1) is empty, not repaired


def box_iou(a: Box, b: Box) -> float:
  """Intersection over union of two (x1, y1, x2, y2) boxes; 0 when the union is empty."""
  inter = box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
  union = box_area(a) + box_area(b) - inter
  return inter / union if union > 0 else 0.0


def point_in_box(point: Point, box: Box) -> bool:
  """Whether the point lies in the box, edges included."""
  return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def grounding_accuracy(prediction: str, answers: Sequence[str], iou_threshold: float = 0.5) -> float:
  """1 when the first box in the prediction has IoU >= 0.5 with a reference box (Acc@0.5).

  A prediction whose first location is a point "[x, y]" is right when the point lies in a reference box.
  A prediction with neither scores 0. Every reference must hold a box.
  """
  refs = _parse_references(answers, parse_box, "grounding_accuracy", "grounding",
                           "holds no [x1, y1, x2, y2] box")
  box_match, point_match = _BOX.search(prediction), _POINT.search(prediction)
  if box_match and (point_match is None or box_match.start() <= point_match.start()):
    box = tuple(_clip(v) for v in box_match.groups())
    return float(any(box_iou(box, ref) >= iou_threshold for ref in refs))
  if point_match:
    point = (_clip(point_match.group(1)), _clip(point_match.group(2)))
    return float(any(point_in_box(point, ref) for ref in refs))
  return 0.0


# ---------------------------------------------------------------------------------------------------------------
# CIDEr-D (Vedantam et al., 2015) for descriptions: a corpus metric, its n-gram weights come from every reference
# of the benchmark, so it is computed over a whole benchmark (`corpus_scores`), not one example at a time.

# The punctuation tokens coco-caption's PTBTokenizer drops, as single characters (its "''", "``", "--", "..."
# are runs of these).
_CAPTION_PUNCTUATION = frozenset("'`.?!,:-;\"()[]{}")
_CAPTION_TOKEN = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*|\S")


def caption_tokens(text: str) -> str:
  """Lower-cased words, punctuation dropped: coco-caption's PTBTokenizer step done in Python (it runs Java's
  Stanford tokenizer), close to it on plain English ("Wi-Fi" stays one word, as in PTB)."""
  words = _CAPTION_TOKEN.findall(text.lower())
  return " ".join(w for w in words if not all(ch in _CAPTION_PUNCTUATION for ch in w))


def cider_d(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> list[float]:
  """Per-example CIDEr-D of a benchmark (its mean is the benchmark's CIDEr-D; 0..10, papers print it x100).

  coco-caption's scorer (pycocoevalcap.cider, n-grams 1..4, sigma 6, clipped counts, x10) on `caption_tokens`:
  document frequencies over the references of all examples, so a benchmark of one example scores 0.
  """
  from pycocoevalcap.cider.cider_scorer import CiderScorer

  if len(predictions) != len(answers) or not predictions:
    raise ValueError(f"cider_d: {len(predictions)} predictions and {len(answers)} reference lists")
  scorer = CiderScorer(n=4, sigma=6.0)
  for prediction, refs in zip(predictions, answers):
    if isinstance(refs, str) or not refs:
      raise ValueError(f"cider_d needs a non-empty list of references, got {refs!r}")
    scorer += (caption_tokens(prediction), [caption_tokens(r) for r in refs])
  _, per_example = scorer.compute_score()
  return [float(v) for v in per_example]


def _corpus_only(prediction: str, answers: Sequence[str]) -> float:
  raise ValueError("cider is scored over a whole benchmark: use metrics.corpus_scores")


# ---------------------------------------------------------------------------------------------------------------

METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "exact": exact_match,
    "vqa": vqa_accuracy,
    "anls": anls,
    "relaxed": relaxed_accuracy,
    "iou": grounding_accuracy,
    "mc": multiple_choice_accuracy,
    "mme": mme_accuracy,
    "pope": pope_accuracy,
    "cider": _corpus_only,
}
CORPUS_METRICS = {"cider": cider_d}


def score(metric: str, prediction: str, answers: list[str]) -> float:
  """Score one prediction against its reference answers with the named metric, in [0, 1]."""
  try:
    fn = METRICS[metric]
  except KeyError:
    raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}") from None
  if isinstance(answers, str):
    raise ValueError(f"answers must be a list of strings, got the string {answers!r}")
  return fn(prediction, answers)


def mean_score(metric: str, predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
  """Mean of `score` over a benchmark, in [0, 1]."""
  if len(predictions) != len(answers):
    raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
  if not predictions:
    raise ValueError("mean_score of an empty benchmark")
  return sum(corpus_scores(metric, predictions, answers)) / len(predictions)


def corpus_scores(metric: str, predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> list[float]:
  """Per-example scores of a whole benchmark: `score` of each example, or a corpus metric's (CORPUS_METRICS)."""
  if metric in CORPUS_METRICS:
    return CORPUS_METRICS[metric](predictions, [list(a) for a in answers])
  if len(predictions) != len(answers):
    raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
  return [score(metric, p, list(a)) for p, a in zip(predictions, answers)]
