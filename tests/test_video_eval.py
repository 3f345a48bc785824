"""Video benchmarks as data: Video-MME and MVBench-style imports, multiple-choice scoring, the Video category."""
import json

import numpy as np
import pytest

from mm15_jax import cli
from mm15_jax.data import records, video
from mm15_jax.eval import metrics, report, suites, summaries


def clip(level, n=6):
  return video.encode_frames([np.full((16, 16, 3), level + 10 * i, np.uint8) for i in range(n)], fps=3)


@pytest.fixture
def videomme(tmp_path):
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "abc.avi").write_bytes(clip(20))
  (tmp_path / "xyz.avi").write_bytes(clip(120, n=2))
  rows = [{"video_id": "001", "duration": "short", "domain": "Knowledge", "videoID": "abc", "question_id": "001-1",
           "task_type": "Counting Problem", "question": "How many boxes appear?",
           "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."], "answer": "B"},
          {"video_id": "002", "duration": "long", "videoID": "xyz.avi", "question_id": "002-1",
           "task_type": "Temporal Reasoning", "question": "What happens first?",
           "options": ["A. The box turns red.", "B. The box moves left."], "answer": "A"}]
  path = tmp_path / "videomme.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return tmp_path, path


def test_videomme_import_stores_files_or_frames(videomme):
  root, path = videomme
  out = root / "out"
  cli.main(["eval", "import", "--format", "videomme", "--input", str(path), "--out", str(out), "--name",
            "Video-MME"])
  recs = list(records.open_source(str(out), "Video-MME", "test"))
  assert [r["answers"] for r in recs] == [["B"], ["A"]]
  assert [r["subset"] for r in recs] == ["short", "long"] and recs[0]["task"] == "Counting Problem"
  assert recs[0]["video"] == {"form": "file"} and recs[0]["images"] == [(root / "data" / "abc.avi").read_bytes()]
  question = recs[0]["messages"][0]["content"]
  assert question == ("<video>\nHow many boxes appear?\nA. One.\nB. Two.\nC. Three.\nD. Four.\n"
                      + suites.MC_INSTRUCTION)
  assert recs[0]["category"] == "video" and recs[0]["metric"] == "mc"
  benchmark = suites.from_records(str(out), "Video-MME")
  assert (benchmark.category, benchmark.metric) == ("Video", "mc")
  assert suites.category_table([benchmark])["Video"][0] == "Video-MME"

  cli.main(["eval", "import", "--format", "videomme", "--input", str(path), "--out", str(out), "--name", "VMME3",
            "--video-frames", "3"])
  recs = list(records.open_source(str(out), "VMME3", "test"))
  assert recs[0]["video"] == {"form": "frames", "timestamps": pytest.approx([1 / 3, 1.0, 5 / 3], abs=1e-3)}
  assert len(recs[0]["images"]) == 3 and len(recs[1]["images"]) == 2  # a 2-frame video keeps its 2 frames
  frames = video.record_frames(recs[0], 24, max_pixels=10**6)
  assert [round(float(p.mean())) for p in frames.pixels] == pytest.approx([30, 50, 70], abs=3)


def test_video_imports_name_missing_and_corrupt_videos(videomme):
  root, path = videomme
  (root / "data" / "abc.avi").write_bytes(b"\x00" * 300)
  with pytest.raises(SystemExit, match=r"videomme.jsonl:1 video .*abc.avi: cannot decode video"):
    cli.main(["eval", "import", "--format", "videomme", "--input", str(path), "--out", str(root / "o"), "--name",
              "V"])
  (root / "data" / "abc.avi").unlink()
  with pytest.raises(SystemExit, match=r"videomme.jsonl:1: video .*abc not found"):
    cli.main(["eval", "import", "--format", "videomme", "--input", str(path), "--out", str(root / "o"), "--name",
              "V"])


def test_video_mc_mvbench_json_list_with_text_answers(tmp_path):
  (tmp_path / "clips").mkdir()
  (tmp_path / "clips" / "a.avi").write_bytes(clip(40))
  items = [{"video": "clips/a.avi", "question": "Which way does the ball move?",
            "candidates": ["left", "right", "up"], "answer": "right"},
           {"video": "clips/a.avi", "question": "What colour is it?", "candidates": ["red", "grey"], "answer": "(B)",
            "task": "attribute"}]
  path = tmp_path / "action_sequence.json"
  path.write_text(json.dumps(items))
  cli.main(["eval", "import", "--format", "video_mc", "--input", str(path), "--out", str(tmp_path / "out"),
            "--name", "MVBench"])
  recs = list(records.open_source(str(tmp_path / "out"), "MVBench", "test"))
  assert [r["answers"] for r in recs] == [["B"], ["B"]] and "subset" not in recs[0]
  assert recs[1]["subset"] == "attribute" and "A. red\nB. grey" in recs[1]["messages"][0]["content"]


def test_multiple_choice_accuracy_on_video_records(videomme):
  root, path = videomme
  cli.main(["eval", "import", "--format", "videomme", "--input", str(path), "--out", str(root / "out"), "--name",
            "Video-MME"])
  recs = list(records.open_source(str(root / "out"), "Video-MME", "test"))
  predictions = ["The answer is B.", "B"]
  scores = [metrics.score("mc", p, r["answers"]) for p, r in zip(predictions, recs)]
  assert scores == [1.0, 0.0]
  summary = summaries.summarize("mc", recs, scores, predictions)
  assert summary == {"score": 0.5, "details": {"subsets": {"long": 0.0, "short": 1.0}}}
  table = suites.category_table([suites.from_records(str(root / "out"), "Video-MME")])
  assert report.category_averages({"Video-MME": 0.5, "MVBench": 0.75, "TextVQA": 0.7}, table) == {
      "Text-rich": 0.7, "Video": 0.625}
  assert report.category_averages({"video_qa": 0.4}, report.HELDOUT_CATEGORIES) == {"Video": 0.4}


def test_generic_jsonl_benchmark_with_videos(tmp_path):
  (tmp_path / "c.avi").write_bytes(clip(60, n=4))
  (tmp_path / "bench.jsonl").write_text(
      json.dumps({"video": "c.avi", "question": "Does it get brighter?", "choices": ["yes", "no"],
                  "answers": ["yes"]}) + "\n"
      + json.dumps({"video": "c.avi", "image": "x.png", "question": "Q", "answers": ["A"]}) + "\n")
  with pytest.raises(ValueError, match=r"bench.jsonl:2: field 'video' must be one path"):
    suites.from_jsonl(str(tmp_path / "bench.jsonl"), category="Video", metric="mc").examples()
  (tmp_path / "bench.jsonl").write_text((tmp_path / "bench.jsonl").read_text().splitlines()[0] + "\n")
  (example,) = suites.from_jsonl(str(tmp_path / "bench.jsonl"), category="Video", metric="mc").examples()
  assert example["video"] == {"form": "file"} and example["answers"] == ["A"] and example["category"] == "video"
  assert example["messages"][0]["content"].startswith("<video>\nDoes it get brighter?\nA. yes\nB. no")
  frames = video.record_frames(example, 24, max_pixels=10**6)
  assert len(frames.pixels) == 4 and frames.timestamps == pytest.approx([0, 1 / 3, 2 / 3, 1])
