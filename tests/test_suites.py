"""Benchmarks as data: public-format adapters, the JSONL source, selection, and one tiny-model evaluation."""
import io
import json
import pickle
import random

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from mm15_jax import cli
from mm15_jax.config import DataConfig, SplitConfig
from mm15_jax.data import records
from mm15_jax.data import tokenizer as tokenizer_lib
from mm15_jax.eval import adapters, metrics, run, suites
from mm15_jax.models.multimodal import MultimodalModel
from tests.fixtures import IMAGE_SIZE, TOKENS_PER_TILE, tiny_model


def write_image(path, size=(32, 24), color=(200, 30, 30), fmt="PNG") -> bytes:
  path.parent.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, fmt)
  path.write_bytes(buf.getvalue())
  return buf.getvalue()


def user_text(record):
  assert [m["role"] for m in record["messages"]] == ["user"]
  return record["messages"][0]["content"]


# ---------------------------------------------------------------------------------------------------------------
# Adapters.

def test_textvqa_adapter_and_import(tmp_path):
  answers = ["nokia"] * 7 + ["nokia phone", "noki", "nokia"]
  data = {"dataset_name": "textvqa", "data": [
      {"image_id": "003a8ae2ef43b901", "question": "what brand is the phone?", "answers": answers,
       "question_id": 34602},
      {"image_id": "00685bc495504d61", "question": "what number is on the shirt?", "answers": ["23"] * 10,
       "question_id": 34603}]}
  path = tmp_path / "TextVQA_0.5.1_val.json"
  path.write_text(json.dumps(data))
  first = write_image(tmp_path / "train_images" / "003a8ae2ef43b901.jpg", fmt="JPEG")
  write_image(tmp_path / "train_images" / "00685bc495504d61.jpg", fmt="JPEG")

  got = list(adapters.textvqa_examples(str(path), str(tmp_path)))
  assert len(got) == 2
  assert user_text(got[0]) == "<image>\nwhat brand is the phone?"
  assert got[0]["answers"] == answers and got[0]["metric"] == "vqa" and got[0]["category"] == "text_rich"
  assert got[0]["images"] == [first] and got[0]["example_id"] == 34602 and got[0]["source"] == "TextVQA"

  n = adapters.import_benchmark("textvqa", [str(path)], out_dir=str(tmp_path / "data"), name="TextVQA")
  assert n == 2
  stored = records.open_source(tmp_path / "data", "TextVQA", "test")
  # The import appends TextVQA's default instruction (the usual zero-shot protocol's short-answer request).
  assert [user_text(r) for r in stored] == [user_text(r) + "\n" + adapters.SHORT_ANSWER for r in got]
  assert user_text(stored[0]) == ("<image>\nwhat brand is the phone?\n"
                                  "Answer the question using a single word or phrase.")
  b = suites.from_records(str(tmp_path / "data"), "TextVQA")
  assert (b.category, b.metric) == ("Text-rich", "vqa")
  with pytest.raises(FileExistsError, match="TextVQA"):
    adapters.import_benchmark("textvqa", [str(path)], out_dir=str(tmp_path / "data"), name="TextVQA")

  (tmp_path / "train_images" / "00685bc495504d61.jpg").unlink()
  with pytest.raises(FileNotFoundError, match=r"data\[1\].*00685bc495504d61\.jpg"):
    list(adapters.textvqa_examples(str(path), str(tmp_path)))


def test_docvqa_adapter(tmp_path):
  data = {"dataset_name": "docvqa", "dataset_split": "val", "data": [
      {"questionId": 49153, "question": "What is the date mentioned?", "image": "documents/pybv0228_81.png",
       "docId": 14465, "answers": ["1/8/93", "Jan 8, 1993"]}]}
  path = tmp_path / "val" / "val_v1.0.json"
  path.parent.mkdir()
  path.write_text(json.dumps(data))
  raw = write_image(tmp_path / "val" / "documents" / "pybv0228_81.png")
  (got,) = adapters.examples("docvqa", [str(path)], name="DocVQA")  # images default to the file's folder
  assert user_text(got) == "<image>\nWhat is the date mentioned?\n" + adapters.SHORT_ANSWER
  (plain,) = adapters.examples("docvqa", [str(path)], name="DocVQA", instruction="")  # "" overrides: none
  assert user_text(plain) == "<image>\nWhat is the date mentioned?"
  assert got["answers"] == ["1/8/93", "Jan 8, 1993"] and got["metric"] == "anls" and got["images"] == [raw]

  del data["data"][0]["answers"]  # the test split has none
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=r"data\[0\].*no answers"):
    list(adapters.examples("docvqa", [str(path)], name="DocVQA"))


def test_chartqa_import_through_the_cli(tmp_path, capsys):
  human = [{"imgname": "41699051005347.png", "query": "What is the value of Japan?", "label": "12.5"},
           {"imgname": "multi_col_1.png", "query": "Which year is the highest?", "label": "2019"}]
  augmented = [{"imgname": "two_col_3.png", "query": "How many bars are there?", "label": "4"}]
  (tmp_path / "test").mkdir()
  (tmp_path / "test" / "test_human.json").write_text(json.dumps(human))
  (tmp_path / "test" / "test_augmented.json").write_text(json.dumps(augmented))
  for item in human + augmented:
    write_image(tmp_path / "test" / "png" / item["imgname"])
  out = tmp_path / "data"
  cli.main(["eval", "import", "--format", "chartqa", "--input", str(tmp_path / "test" / "test_human.json"),
            "--input", str(tmp_path / "test" / "test_augmented.json"), "--out", str(out), "--name", "ChartQA",
            "--instruction", "Answer with a single number or word."])
  assert "ChartQA: 3 examples" in capsys.readouterr().out
  stored = list(records.open_source(out, "ChartQA", "test"))
  assert [r["answers"] for r in stored] == [["12.5"], ["2019"], ["4"]]
  assert user_text(stored[0]) == "<image>\nWhat is the value of Japan?\nAnswer with a single number or word."
  assert {r["metric"] for r in stored} == {"relaxed"}
  assert metrics.score("relaxed", "12.9", stored[0]["answers"]) == 1.0  # within 5%


def refcoco_files(tmp_path, refs):
  instances = {
      "images": [{"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "width": 640, "height": 480}],
      "annotations": [{"id": 1719310, "image_id": 581857, "bbox": [100.0, 50.0, 200.0, 120.0], "category_id": 1},
                      {"id": 1719311, "image_id": 581857, "bbox": [600.0, 400.0, 100.0, 100.0], "category_id": 1}],
      "categories": [{"id": 1, "name": "person"}]}
  root = tmp_path / "refcoco"
  root.mkdir()
  (root / "instances.json").write_text(json.dumps(instances))
  with open(root / "refs(unc).p", "wb") as f:
    pickle.dump(refs, f, protocol=2)
  image = write_image(tmp_path / "train2014" / "COCO_train2014_000000581857.jpg", size=(64, 48), fmt="JPEG")
  return root / "refs(unc).p", image


def ref(ref_id, ann_id, split, sentences):
  return {"ref_id": ref_id, "ann_id": ann_id, "image_id": 581857, "split": split, "category_id": 1,
          "file_name": f"COCO_train2014_000000581857_{ann_id}.jpg", "sent_ids": list(range(len(sentences))),
          "sentences": [{"sent": s, "raw": s.upper(), "sent_id": 100 * ref_id + k, "tokens": s.split()}
                        for k, s in enumerate(sentences)]}


def test_refcoco_adapter_boxes_on_the_grid(tmp_path):
  refs = [ref(0, 1719310, "val", ["man on left", "guy in red"]), ref(1, 1719311, "testA", ["bottom right corner"]),
          ref(2, 1719311, "val", ["thing at the edge"])]
  path, image = refcoco_files(tmp_path, refs)
  got = list(adapters.refcoco_examples(str(path), str(tmp_path / "train2014"), split="val"))
  assert [user_text(r) for r in got] == ["<image>\nWhere is man on left? Answer with a box.",
                                         "<image>\nWhere is guy in red? Answer with a box.",
                                         "<image>\nWhere is thing at the edge? Answer with a box."]
  # [x, y, w, h] = [100, 50, 200, 120] in a 640x480 image: x1 = 100/640 = 156.25, y1 = 50/480 = 104.17,
  # x2 = 300/640 = 468.75, y2 = 170/480 = 354.17 (per mille).
  assert got[0]["answers"] == got[1]["answers"] == ["[156, 104, 469, 354]"]
  # [600, 400, 100, 100]: x1 = 937.5 -> 938, y1 = 833.3, x2 = 1093.75 and y2 = 1041.7 clipped to the edge.
  assert got[2]["answers"] == ["[938, 833, 1000, 1000]"]
  assert got[0]["metric"] == "iou" and got[0]["category"] == "refer_ground" and got[0]["images"] == [image]
  assert [r["example_id"] for r in got] == [0, 1, 200]
  assert metrics.score("iou", "[150, 100, 470, 350]", got[0]["answers"]) == 1.0
  # The images folder may also be the COCO root holding train2014/.
  (only,) = adapters.refcoco_examples(str(path), str(tmp_path), split="testA")
  assert user_text(only) == "<image>\nWhere is bottom right corner? Answer with a box."
  with pytest.raises(ValueError, match=r"no refs in split 'test'.*\['testA', 'val'\]"):
    list(adapters.refcoco_examples(str(path), str(tmp_path), split="test"))


def test_refcoco_pickle_may_not_hold_objects(tmp_path):
  path, _ = refcoco_files(tmp_path, [ref(0, 1719310, "val", ["man"])])
  with open(path, "wb") as f:
    pickle.dump([random.Random(0)], f, protocol=2)  # a class instance: loading would run its constructor
  with pytest.raises(ValueError, match="refuses to load random.Random"):
    list(adapters.refcoco_examples(str(path), str(tmp_path)))


# ---------------------------------------------------------------------------------------------------------------
# JSONL source and selection.

def write_jsonl(path, items):
  path.write_text("".join(json.dumps(item) + "\n" for item in items))


def test_jsonl_source(tmp_path):
  one = write_image(tmp_path / "img" / "a.png", color=(10, 200, 10))
  two = write_image(tmp_path / "img" / "b.png", color=(10, 10, 200))
  path = tmp_path / "quiz.jsonl"
  write_jsonl(path, [
      {"image": "img/a.png", "question": "What colour is it?", "choices": ["red", "green", "blue"],
       "answers": ["green"]},
      {"image": ["img/a.png", "img/b.png"], "question": "Which image is blue?", "choices": ["first", "second"],
       "answers": ["B"], "id": "q2"}])
  b = suites.from_jsonl(str(path), category="Multi-image", metric="mc")
  assert b.name == "quiz"
  got = b.examples()
  assert user_text(got[0]) == ("<image>\nWhat colour is it?\nA. red\nB. green\nC. blue\n" + suites.MC_INSTRUCTION)
  assert got[0]["answers"] == ["B"] and got[0]["images"] == [one]
  assert user_text(got[1]).startswith("<image>\n<image>\nWhich image is blue?\nA. first\nB. second")
  assert got[1]["images"] == [one, two] and got[1]["answers"] == ["B"] and got[1]["example_id"] == "q2"
  assert got[1]["category"] == "multi_image" and got[1]["source"] == "quiz"
  assert len(b.examples(max_examples=1)) == 1

  vqa = tmp_path / "free.jsonl"
  write_jsonl(vqa, [{"image": "img/b.png", "question": "Colour? <image>", "answers": ["blue"]}])
  (example,) = suites.from_jsonl(str(vqa), category="General", metric="vqa").examples()
  assert user_text(example) == "Colour? <image>" and example["answers"] == ["blue"]  # its own mark kept

  write_jsonl(path, [{"image": "img/a.png", "question": "Colour?", "answers": ["B"]},
                     {"image": "img/a.png", "question": "Colour?", "choices": ["red"], "answers": ["purple"]}])
  with pytest.raises(ValueError, match=r"quiz.jsonl:2: answer 'purple'"):
    b.examples()
  path.write_text('{"image": "img/a.png", "question": "Colour?", "answers": ["B"]}\n{not json\n')
  with pytest.raises(ValueError, match=r"quiz.jsonl:2: not JSON"):
    b.examples()
  write_jsonl(path, [{"image": "img/missing.png", "question": "Colour?", "answers": ["B"]}])
  with pytest.raises(FileNotFoundError, match=r"quiz.jsonl:1: image .*missing.png"):
    b.examples()
  write_jsonl(path, [{"image": "img/a.png", "question": "Colour?", "answers": ["blue"]}])
  with pytest.raises(ValueError, match=r"quiz.jsonl:1: multiple-choice reference 'blue'"):
    b.examples()
  with pytest.raises(ValueError, match="category 'Science'"):
    suites.from_jsonl(str(path), category="Science", metric="mc")


def heldout(answer, metric="exact", category="general", source="shapes"):
  return {"kind": "sft", "source": source, "category": category, "images": [SMALL_PNG],
          "messages": [{"role": "user", "content": "<image>\nWhat colour is the square?"}],
          "answers": [answer], "metric": metric}


def trained(answer, source="shapes"):
  return {"kind": "sft", "source": source, "category": "general", "images": [SMALL_PNG],
          "messages": [{"role": "user", "content": "<image>\nWhat colour is the square?"},
                       {"role": "assistant", "content": answer}]}


_buf = io.BytesIO()
Image.new("RGB", (40, 24), (255, 0, 0)).save(_buf, "PNG")
SMALL_PNG = _buf.getvalue()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("benchmarks")
  records.write_source(root, "shapes", {"train": [trained("red"), trained("red"), trained("blue")],
                                        "test": [heldout("red"), heldout("blue")]})
  records.write_source(root, "boxes", {"test": [heldout("[0, 0, 500, 500]", "iou", "refer_ground", "boxes")]})
  records.write_source(root, "only_train", {"train": [trained("red", "only_train")]})
  return str(root)


def test_selection(data_dir):
  assert suites.available(data_dir) == ["boxes", "shapes"]
  every = suites.select(data_dir)
  assert [(b.name, b.category, b.metric) for b in every] == [("boxes", "Refer&Ground", "iou"),
                                                             ("shapes", "General", "exact")]
  assert [b.name for b in suites.select(data_dir, "shapes")] == ["shapes"]
  with pytest.raises(ValueError, match=r"unknown benchmark\(s\) \['nope'\].*\['boxes', 'shapes'\]"):
    suites.select(data_dir, "shapes,nope")
  with pytest.raises(ValueError, match=r"\['only_train'\]"):
    suites.select(data_dir, ["only_train"])
  with pytest.raises(ValueError, match="more than once"):
    suites.select(data_dir, "shapes,shapes")
  table = suites.category_table(every)
  assert table["General"][-1] == "shapes" and table["Refer&Ground"][-1] == "boxes"
  with pytest.raises(ValueError, match="'TextVQA' is in category 'General'"):
    suites.category_table([suites.Benchmark("TextVQA", "General", "vqa", every[0].source)])


def test_eval_spec_n_max():
  cfg = DataConfig(split=SplitConfig(mode="dynamic", n_min=4, n_max=9), seq_len=64, max_images=20)
  spec = run.eval_spec(cfg, tile_size=16, tokens_per_tile=4, n_max=16)
  assert spec.max_images == 2 * 17  # two split images of up to 16 tiles + overview each
  assert run.eval_spec(cfg, tile_size=16, tokens_per_tile=4).max_images == 20
  with pytest.raises(ValueError, match="n_min"):
    run.eval_spec(cfg, tile_size=16, tokens_per_tile=4, n_max=3)
  with pytest.raises(ValueError, match=r"\[split.n_min=4, 16\]"):
    run.eval_spec(cfg, tile_size=16, tokens_per_tile=4, n_max=17)
  cfg.split.mode = "static"
  with pytest.raises(ValueError, match="'static'"):
    run.eval_spec(cfg, tile_size=16, tokens_per_tile=4, n_max=16)


# ---------------------------------------------------------------------------------------------------------------
# One tiny model, four examples.

def test_evaluate_params_tiny_model(data_dir, tmp_path):
  rng = random.Random(0)
  words = "what colour is the square red blue green box where answer with a".split()
  texts = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)]
  tok = tokenizer_lib.Tokenizer(tokenizer_lib.train_sentencepiece(texts, str(tmp_path / "tok.model"),
                                                                  vocab_size=300))
  model = MultimodalModel(tiny_model(vocab_size=tok.vocab_size), rngs=nnx.Rngs(0))
  data_cfg = DataConfig(split=SplitConfig(mode="dynamic", n_min=1, n_max=2), seq_len=160,
                        max_images=6)
  write_image(tmp_path / "a.png", size=(40, 24))
  write_jsonl(tmp_path / "pick.jsonl", [
      {"image": "a.png", "question": "Colour?", "choices": ["red", "blue"], "answers": ["red"]},
      {"image": "a.png", "question": "Shape?", "choices": ["square", "circle"], "answers": ["square"]}])
  benchmarks = [suites.from_records(data_dir, "shapes"),
                suites.from_jsonl(str(tmp_path / "pick.jsonl"), category="General", metric="mc")]
  predictions = tmp_path / "out" / "predictions.jsonl"
  result = run.evaluate_params(model, tok, data_cfg, tile_size=IMAGE_SIZE, tokens_per_tile=TOKENS_PER_TILE,
                               benchmarks=benchmarks, n_max=3, batch_size=2, max_new_tokens=3,
                               predictions_path=str(predictions), log=lambda _: None)

  lines = [json.loads(line) for line in predictions.read_text().splitlines()]
  assert [(x["benchmark"], x["index"]) for x in lines] == [("shapes", 0), ("shapes", 1), ("pick", 0), ("pick", 1)]
  for name, metric in (("shapes", "exact"), ("pick", "mc")):
    mine = [x for x in lines if x["benchmark"] == name]
    for x in mine:
      assert x["score"] == metrics.score(metric, x["prediction"], x["answers"])
    got = result["benchmarks"][name]
    assert got["n"] == 2 and got["score"] == pytest.approx(np.mean([x["score"] for x in mine]))
    assert [e["prediction"] for e in got["examples"]] == [x["prediction"] for x in mine]
  # Blind baseline: "red", the most frequent training answer, is right on one of the two questions.
  assert result["benchmarks"]["shapes"]["blind_answer"] == "red"
  assert result["benchmarks"]["shapes"]["baseline"] == 0.5
  assert result["benchmarks"]["pick"]["baseline"] is None  # no training split
  general = result["categories"]["General"]
  assert general["score"] == pytest.approx((result["benchmarks"]["shapes"]["score"] +
                                            result["benchmarks"]["pick"]["score"]) / 2)
  assert general["baseline"] == 0.5 and result["mmbase"] is None

  report = run.write_outputs(result, str(tmp_path / "out"), title="tiny")
  on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
  assert on_disk == report and on_disk["benchmarks"] == {"pick": result["benchmarks"]["pick"]["score"],
                                                         "shapes": result["benchmarks"]["shapes"]["score"]}
  assert on_disk["missing"]["General"] == ["MME", "SEED", "POPE", "LLaVA-Wild", "MM-Vet", "RealWorldQA"]
  assert (tmp_path / "out" / "categories.png").read_bytes()[:4] == b"\x89PNG"
  table = run.format_table(result)
  assert "shapes" in table and "pick" in table and "MMBase - (needs General, Text-rich, Knowledge)" in table
