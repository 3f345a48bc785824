"""The evaluation protocol's importers: MME, POPE, multi-image multiple choice, few-shot prompts, and the default
instructions; each imported set scored end to end by metrics + summaries."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mm15_jax import cli
from mm15_jax.data import records
from mm15_jax.eval import adapters, metrics, suites, summaries
from tests.test_suites import user_text, write_image, write_jsonl


def mme_release(root):
  """Two subtask layouts of the MME release: images/ + questions_answers_YN/, and both side by side."""
  images = {}
  images["artwork/10002"] = write_image(root / "artwork" / "images" / "10002.jpg", fmt="JPEG")
  (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
  (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
      "Is this artwork created by Donatello? Please answer yes or no.\tYes\n"
      "Is this artwork created by Pierre-Auguste Renoir? Please answer yes or no.\tNo\n")
  for stem, color in (("000000006040", (1, 2, 3)), ("000000044279", (9, 9, 9))):
    images[f"count/{stem}"] = write_image(root / "count" / f"{stem}.jpg", color=color, fmt="JPEG")
    (root / "count" / f"{stem}.txt").write_text(
        "Is there a train in the picture? Please answer yes or no.\tYes\n"
        "Are there a total of two trains in the picture? Please answer yes or no.\tNo\n")
  return images


def test_mme_import_and_score(tmp_path):
  images = mme_release(tmp_path / "MME_Benchmark_release_version")
  got = list(adapters.examples("mme", [str(tmp_path / "MME_Benchmark_release_version")], name="MME"))
  assert len(got) == 6
  assert [r["subset"] for r in got] == ["artwork"] * 2 + ["count"] * 4
  assert got[0]["group"] == "artwork/10002" and got[0]["images"] == [images["artwork/10002"]]
  assert user_text(got[0]) == "<image>\nIs this artwork created by Donatello? Please answer yes or no."  # no extra
  assert [r["answers"] for r in got[:2]] == [["Yes"], ["No"]] and {r["metric"] for r in got} == {"mme"}
  assert got[2]["images"] == [images["count/000000006040"]] and got[2]["category"] == "general"

  preds = ["Yes", "No", "Yes", "Yes", "yes", "no"]  # artwork both right; count: first image half, second both
  scores = [metrics.score("mme", p, r["answers"]) for p, r in zip(preds, got)]
  summary = summaries.summarize("mme", got, scores, preds)
  assert summary["details"]["subtasks"]["artwork"] == {"acc": 100.0, "acc_plus": 100.0, "score": 200.0}
  assert summary["details"]["subtasks"]["count"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
  assert summary["details"]["perception"] == summary["details"]["total"] == 325.0

  (tmp_path / "MME_Benchmark_release_version" / "count" / "000000044279.txt").write_text("Is it? Maybe\n")
  with pytest.raises(ValueError, match=r"000000044279.txt:1: expected 'question<TAB>Yes'"):
    list(adapters.examples("mme", [str(tmp_path / "MME_Benchmark_release_version")], name="MME"))
  with pytest.raises(ValueError, match="MME release folder"):
    list(adapters.examples("mme", [str(tmp_path / "nope.txt")], name="MME"))


def test_pope_import_through_the_cli(tmp_path, capsys):
  coco = tmp_path / "val2014"
  raw = write_image(coco / "COCO_val2014_000000310196.jpg", fmt="JPEG")
  write_image(coco / "COCO_val2014_000000210789.jpg", fmt="JPEG")
  inputs = []
  for split in ("random", "adversarial"):
    path = tmp_path / f"coco_pope_{split}.json"
    write_jsonl(path, [
        {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
         "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000210789.jpg", "text": "Is there a car in the image?",
         "label": "no"}])
    inputs += ["--input", str(path)]
  cli.main(["eval", "import", "--format", "pope", *inputs, "--images", str(coco), "--out", str(tmp_path / "data"),
            "--name", "POPE"])
  assert "POPE: 4 examples" in capsys.readouterr().out
  stored = list(records.open_source(tmp_path / "data", "POPE", "test"))
  assert [r["subset"] for r in stored] == ["random", "random", "adversarial", "adversarial"]
  assert user_text(stored[0]) == ("<image>\nIs there a snowboard in the image?\n"
                                  "Answer the question using a single word or phrase.")
  assert stored[0]["images"] == [raw] and stored[1]["answers"] == ["no"]
  b = suites.from_records(str(tmp_path / "data"), "POPE")
  assert (b.category, b.metric) == ("General", "pope")
  preds = ["Yes", "No", "yes", "yes"]
  summary = summaries.summarize("pope", stored, [metrics.score("pope", p, r["answers"]) for p, r in
                                                 zip(preds, stored)], preds)
  assert summary["details"]["splits"]["random"]["f1"] == 1.0
  assert summary["details"]["splits"]["adversarial"]["precision"] == 0.5
  assert summary["score"] == pytest.approx((1.0 + 2 / 3) / 2)

  write_jsonl(tmp_path / "coco_pope_bad.json", [{"image": "COCO_val2014_000000310196.jpg", "text": "Is it?",
                                                 "label": "maybe"}])
  with pytest.raises(SystemExit, match=r"coco_pope_bad.json:1: label must be 'yes' or 'no'"):
    cli.main(["eval", "import", "--format", "pope", "--input", str(tmp_path / "coco_pope_bad.json"), "--images",
              str(coco), "--out", str(tmp_path / "data"), "--name", "POPEbad"])


def test_multi_image_mc_blink_parquet(tmp_path):
  a, b = write_image(tmp_path / "a.png"), write_image(tmp_path / "b.png", color=(0, 0, 250))
  table = pa.table({
      "idx": ["val_Jigsaw_1", "val_Jigsaw_2"],
      "question": ["Which image fills the missing part?", "Which one is blue?"],
      "sub_task": ["Jigsaw", "Jigsaw"],
      "image_1": [{"bytes": a, "path": "a.png"}, {"bytes": a, "path": "a.png"}],
      "image_2": [{"bytes": b, "path": "b.png"}, {"bytes": b, "path": "b.png"}],
      "image_3": [{"bytes": a, "path": "a.png"}, None],
      "choices": [["image 2", "image 3"], ["first", "second"]],
      "answer": ["(A)", "(B)"]})
  pq.write_table(table, tmp_path / "val-00000-of-00001.parquet")
  got = list(adapters.examples("multi_mc", [str(tmp_path / "val-00000-of-00001.parquet")], name="BLINK"))
  assert user_text(got[0]) == ("<image>\n<image>\n<image>\nWhich image fills the missing part?\nA. image 2\n"
                               "B. image 3\n" + suites.MC_INSTRUCTION)
  assert got[0]["images"] == [a, b, a] and got[1]["images"] == [a, b]  # a null image_3 is no image
  assert [r["answers"] for r in got] == [["A"], ["B"]] and got[0]["subset"] == "Jigsaw"
  assert got[0]["category"] == "multi_image" and got[0]["metric"] == "mc" and got[0]["example_id"] == "val_Jigsaw_1"


def test_multi_image_mc_muirbench_jsonl(tmp_path):
  write_image(tmp_path / "imgs" / "1.png")
  write_image(tmp_path / "imgs" / "2.png")
  path = tmp_path / "muir.jsonl"
  write_jsonl(path, [{"idx": "1", "task": "Image-Text Matching", "question": "<image> Which caption fits? <image>",
                      "options": ["a dog", "a cat"], "answer": "B", "image_list": ["1.png", "2.png"]}])
  (got,) = adapters.examples("multi_mc", [str(path)], name="MuirBench", images_dir=str(tmp_path / "imgs"))
  assert user_text(got).startswith("<image> Which caption fits? <image>\nA. a dog\nB. a cat\n")  # marks kept
  assert got["subset"] == "Image-Text Matching" and got["answers"] == ["B"] and len(got["images"]) == 2
  write_jsonl(path, [{"question": "Which?", "options": ["x"], "answer": "A", "image_list": []}])
  with pytest.raises(ValueError, match=r"muir.jsonl:1: no images"):
    list(adapters.examples("multi_mc", [str(path)], name="MuirBench"))


def test_few_shot_prompts(tmp_path):
  images = [write_image(tmp_path / f"{i}.png", color=(i * 40, 0, 0)) for i in range(5)]
  support = tmp_path / "support.jsonl"
  write_jsonl(support, [{"image": f"{i}.png", "question": f"What is shown? ({i})", "answers": [f"s{i}"]}
                        for i in range(4)])
  query = tmp_path / "query.jsonl"
  write_jsonl(query, [{"image": "4.png", "question": "What is shown?", "answers": ["q"]}])
  (got,) = adapters.examples("jsonl", [str(query)], name="icl", metric="exact", category="General", shots=2,
                             support=[str(support)], seed=3)
  roles = [m["role"] for m in got["messages"]]
  assert roles == ["user", "assistant", "user", "assistant", "user"] and got["shots"] == 2
  shown = [int(m["content"].split("(")[1][0]) for m in got["messages"][0:4:2]]
  assert len(set(shown)) == 2  # two different support examples, each answered by its reference
  assert [got["messages"][1]["content"], got["messages"][3]["content"]] == [f"s{i}" for i in shown]
  assert got["images"] == [images[i] for i in shown] + [images[4]]  # support images first, in turn order
  assert got["messages"][4]["content"] == "<image>\nWhat is shown?\n" + adapters.SHORT_ANSWER
  assert got["answers"] == ["q"]
  (again,) = adapters.examples("jsonl", [str(query)], name="icl", metric="exact", category="General", shots=2,
                               support=[str(support)], seed=3)
  assert again == got  # the draw is seeded
  with pytest.raises(ValueError, match="5 shots, but the support files"):
    list(adapters.examples("jsonl", [str(query)], name="icl", metric="exact", category="General", shots=5,
                           support=[str(support)]))
  with pytest.raises(ValueError, match="--support"):
    list(adapters.examples("jsonl", [str(query)], name="icl", metric="exact", category="General", shots=1))


def test_default_instructions():
  assert adapters.default_instruction("textvqa") == "Answer the question using a single word or phrase."
  assert adapters.default_instruction("jsonl", "vqa") == adapters.SHORT_ANSWER
  assert adapters.default_instruction("jsonl", "mc") == "" == adapters.default_instruction("refcoco")
  assert adapters.default_instruction("mme") == ""  # MME's questions end in "Please answer yes or no."
  assert set(adapters.DEFAULT_INSTRUCTIONS) | {"jsonl"} == set(adapters.FORMATS)


def test_yes_no_references_checked_at_import():
  with pytest.raises(ValueError, match=r"q.jsonl:1: pope references must be 'yes' or 'no'"):
    suites.make_example(source="s", category="General", metric="pope", question="Is it?", answers=["maybe"],
                        images=[b"x"], where="q.jsonl:1")
