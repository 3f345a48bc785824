"""Stage-1 documents and SFT parquet: `mm15 data convert` kinds interleaved (OBELICS), text, and sft (the_cauldron,
LLaVA-OneVision), from parquet and JSONL, with the bad-entry accounting of the other converters."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mm15_jax import cli
from mm15_jax.data import convert
from mm15_jax.data.convert_formats import ConvertOptions
from tests.test_convert import CORRUPT, _image, _read


def _struct(data: bytes, path: str = "x.png") -> dict:
  return {"bytes": data, "path": path}


def _jsonl(path, rows) -> str:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def test_interleaved_obelics_parquet_through_the_cli(tmp_path, capsys):
  a, b = _image(1), _image(2, "JPEG")
  image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  images = [[None, _struct(a), None, _struct(b)],  # text, image, text, image
            [None, None],
            [_struct(CORRUPT), None],
            [None, _struct(a)]]
  texts = [["A cat sat.", None, "  ", None],  # a blank text is dropped
           ["Only text here.", "And more."],
           [None, "caption"],
           ["two", "things"]]  # position 1 holds both: malformed
  pq.write_table(pa.table({"images": pa.array(images, pa.list_(image)), "texts": texts,
                           "general_metadata": ["{}"] * 4}), tmp_path / "obelics-00000.parquet")
  # OBELICS as published: image URLs (list<string>), which must be downloaded first.
  pq.write_table(pa.table({"images": [["https://example.com/cat.jpg", None]], "texts": [[None, "caption"]]}),
                 tmp_path / "obelics-00001.parquet")
  cli.main(["data", "convert", "--format", "parquet", "--kind", "interleaved", "--input", str(tmp_path),
            "--out", str(tmp_path / "data"), "--name", "interleaved", "--max-bad-fraction", "0.7"])
  got = _read(tmp_path / "data", "interleaved")
  assert [(r["kind"], r["segments"], r["images"]) for r in got] == [
      ("interleaved", ["A cat sat.", 0, 1], [a, b]), ("interleaved", ["Only text here.", "And more."], [])]
  out = capsys.readouterr().out
  assert "wrote 2 records" in out and "skipped 3 bad entries" in out
  assert "image is a URL 1" in out and "unreadable image 1" in out and "malformed document 1" in out
  assert "download the images first" in out


def test_interleaved_jsonl_paths(tmp_path):
  (tmp_path / "imgs").mkdir()
  a = _image(3)
  (tmp_path / "imgs" / "a.png").write_bytes(a)
  path = _jsonl(tmp_path / "docs.jsonl", [
      {"images": ["imgs/a.png", None], "texts": [None, "after the image"]},
      {"images": ["imgs/lost.png", None], "texts": [None, "x"]},
      {"images": [None], "texts": [None]},  # no text at all
      "{not json",
      {"images": [None, None], "texts": ["x"]}])  # lengths differ
  summary = convert.convert([path], str(tmp_path / "d"), "docs",
                            ConvertOptions("jsonl", "interleaved", "docs", image_column="images",
                                           text_column="texts"), max_bad_fraction=0.9, progress=None)
  (got,) = _read(tmp_path / "d", "docs")
  assert got["segments"] == [0, "after the image"] and got["images"] == [a] and got["source"] == "docs"
  assert summary.bad_by_reason == {"missing image file": 1, "missing field": 2, "malformed document": 1}


def test_text_parquet_and_jsonl(tmp_path):
  pq.write_table(pa.table({"text": ["first document", None, "   ", "second"], "id": [1, 2, 3, 4]}),
                 tmp_path / "t.parquet")
  summary = convert.convert([str(tmp_path / "t.parquet")], str(tmp_path / "d"), "text",
                            ConvertOptions("parquet", "text", "text"), max_bad_fraction=0.5, progress=None)
  assert [(r["kind"], r["text"], r["images"]) for r in _read(tmp_path / "d", "text")] == [
      ("text", "first document", []), ("text", "second", [])]
  assert summary.bad == 2 and summary.bad_by_reason == {"missing field": 2}
  path = _jsonl(tmp_path / "t.jsonl", [{"content": "from jsonl"}, {"content": 5}])
  convert.convert([path], str(tmp_path / "d"), "text2", ConvertOptions("jsonl", "text", "text2",
                                                                       text_column="content"),
                  max_bad_fraction=0.5, progress=None)
  assert [r["text"] for r in _read(tmp_path / "d", "text2")] == ["from jsonl"]
  with pytest.raises(convert.ConvertError, match="'body' is not a column"):
    convert.convert([str(tmp_path / "t.parquet")], str(tmp_path / "d"), "text3",
                    ConvertOptions("parquet", "text", "text3", text_column="body"), progress=None)
  with pytest.raises(convert.ConvertError, match=r"--kind 'sft': --format jsonl makes one of \('text', "):
    convert.convert([path], str(tmp_path / "d"), "x", ConvertOptions("jsonl", "sft", "x", category="general"),
                    progress=None)


def test_sft_parquet_the_cauldron(tmp_path):
  a, b = _image(5), _image(6)
  pq.write_table(pa.table({
      "images": [[_struct(a)], [_struct(a), _struct(b)], [_struct(CORRUPT)], []],
      "texts": [[{"user": "What is it?", "assistant": "A chart.", "source": "chartqa"},
                 {"user": "Which year?", "assistant": "2019", "source": "chartqa"}],
                [{"user": "Compare them.", "assistant": "Same.", "source": "x"}],
                [{"user": "Q", "assistant": "A", "source": "x"}],
                [{"user": "Plain text question", "assistant": "Plain answer", "source": "x"}]]}),
      tmp_path / "chartqa-train.parquet")
  summary = convert.convert([str(tmp_path / "chartqa-train.parquet")], str(tmp_path / "d"), "cauldron",
                            ConvertOptions("parquet", "sft", "cauldron", category="text_rich"), max_bad_fraction=0.5,
                            progress=None)
  got = _read(tmp_path / "d", "cauldron")
  assert got[0]["messages"] == [{"role": "user", "content": "<image>\nWhat is it?"},
                                {"role": "assistant", "content": "A chart."},
                                {"role": "user", "content": "Which year?"}, {"role": "assistant", "content": "2019"}]
  assert got[0]["images"] == [a] and got[0]["category"] == "text_rich" and got[0]["kind"] == "sft"
  assert got[1]["messages"][0]["content"] == "<image>\n<image>\nCompare them." and got[1]["images"] == [a, b]
  assert got[2]["images"] == [] and got[2]["messages"][0]["content"] == "Plain text question"
  assert summary.bad_by_reason == {"unreadable image": 1}
  with pytest.raises(convert.ConvertError, match="--category is required for --format parquet --kind sft"):
    convert.convert([str(tmp_path / "chartqa-train.parquet")], str(tmp_path / "d"), "c2",
                    ConvertOptions("parquet", "sft", "c2"), progress=None)


def test_sft_parquet_llava_onevision(tmp_path):
  a = _image(7)
  pq.write_table(pa.table({
      "id": ["1", "2", "3", "4"],
      "image": [_struct(a), None, _struct(a), {"bytes": None, "path": "gone.png"}],
      "conversations": [[{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A dog."}],
                        [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}],
                        [{"from": "human", "value": "<image> <image> Two?"}, {"from": "gpt", "value": "No."}],
                        [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]],
      "data_source": ["a", "b", "c", "d"]}), tmp_path / "ov.parquet")
  summary = convert.convert([str(tmp_path / "ov.parquet")], str(tmp_path / "d"), "ov",
                            ConvertOptions("parquet", "sft", "ov", category="general"), max_bad_fraction=0.5,
                            progress=None)
  got = _read(tmp_path / "d", "ov")
  assert [m["content"] for m in got[0]["messages"]] == ["<image>\nDescribe.", "A dog."] and got[0]["images"] == [a]
  assert got[1]["images"] == [] and got[1]["messages"][1] == {"role": "assistant", "content": "Hi."}
  # row 3: two markers for one image; row 4: a struct without bytes whose path is not under the file's folder
  assert summary.bad_by_reason == {"image markers": 1, "missing image file": 1}
  pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), tmp_path / "other.parquet")
  with pytest.raises(convert.ConvertError, match="neither the LLaVA-OneVision .* nor the_cauldron"):
    convert.convert([str(tmp_path / "other.parquet")], str(tmp_path / "d"), "o",
                    ConvertOptions("parquet", "sft", "o", category="general"), progress=None)
