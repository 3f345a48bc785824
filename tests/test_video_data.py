"""Video data: the LLaVA-Video converter on fixtures written here, and the synthetic video corpus."""
import json

import numpy as np
import pytest

from mm15_jax import cli
from mm15_jax.data import convert, records, video


def clip(n=5, level=30):
  return video.encode_frames([np.full((16, 24, 3), level + 20 * i, np.uint8) for i in range(n)], fps=2)


@pytest.fixture
def llava_video(tmp_path):
  videos = tmp_path / "videos" / "academic"
  videos.mkdir(parents=True)
  (videos / "a.avi").write_bytes(clip())
  (videos / "b.avi").write_bytes(clip(3, 100))
  (videos / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 200)
  (videos / "empty.mp4").write_bytes(b"")
  entries = [
      {"id": "a", "video": "academic/a.avi", "data_source": "x",
       "conversations": [{"from": "human", "value": "<image>\nWhat happens?"},
                         {"from": "gpt", "value": "The box gets brighter."},
                         {"from": "human", "value": "How long?"}, {"from": "gpt", "value": "Two seconds."}]},
      {"id": "b", "video": "academic/b.avi",
       "conversations": [{"from": "human", "value": "Describe the clip."}, {"from": "gpt", "value": "Grey."}]},
      {"id": "missing", "video": "academic/none.mp4",
       "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
      {"id": "corrupt", "video": "academic/corrupt.mp4",
       "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
      {"id": "empty", "video": "academic/empty.mp4",
       "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
      {"id": "two", "video": "academic/a.avi",
       "conversations": [{"from": "human", "value": "<image><video>Q"}, {"from": "gpt", "value": "A"}]},
  ]
  path = tmp_path / "llava_video_qa.json"
  path.write_text(json.dumps(entries))
  return tmp_path, path


def convert_args(root, path, name, *extra):
  return ["data", "convert", "--format", "llava-video", "--input", str(path), "--out", str(root / "data"),
          "--name", name, "--image-root", str(root / "videos"), "--max-bad-fraction", "1", *extra]


def test_llava_video_converter_stores_files_and_counts_bad_videos(llava_video, capsys):
  root, path = llava_video
  cli.main(convert_args(root, path, "video_sft"))
  out = capsys.readouterr().out
  assert "skipped 4 bad entries" in out
  for key, reason in (("missing", "missing video file"), ("corrupt", "unreadable video"),
                      ("empty", "unreadable video"), ("two", "video markers")):
    assert f"skipped {key!r}: {reason}" in out
  recs = list(records.open_source(str(root / "data"), "video_sft", "train"))
  assert [r["video"] for r in recs] == [{"form": "file"}] * 2
  assert recs[0]["images"] == [(root / "videos" / "academic" / "a.avi").read_bytes()]
  assert recs[0]["messages"][0]["content"] == "<video>\nWhat happens?" and len(recs[0]["messages"]) == 4
  assert recs[1]["messages"][0]["content"] == "<video>\nDescribe the clip."
  assert {r["category"] for r in recs} == {"video"} and {r["source"] for r in recs} == {"video_sft"}


def test_llava_video_converter_stores_sampled_frames(llava_video, tok):
  from mm15_jax.config import SplitConfig
  from mm15_jax.data import samples
  root, path = llava_video
  cli.main(convert_args(root, path, "video_frames", "--video-frames", "2"))
  recs = list(records.open_source(str(root / "data"), "video_frames", "train"))
  assert recs[0]["video"] == {"form": "frames", "timestamps": [0.5, 1.5]}  # frames 1 and 3 of 5 at 2 fps
  assert recs[1]["video"]["timestamps"] == [0.0, 1.0]
  spec = samples.SampleSpec(split=SplitConfig(mode="none", tile_size=8), tile_size=8, tokens_per_tile=2,
                            seq_len=256, max_images=4, max_pixels=10**6, video_frames=24)
  sample = samples.make_sample(recs[0], tok, spec)
  assert sample.n_tiles == 2 and [round(float(t[:5].mean())) for t in sample.tiles] == pytest.approx([50, 90], abs=4)


def test_llava_video_converter_errors(llava_video):
  root, path = llava_video
  with pytest.raises(SystemExit, match="--image-root '' is not a folder .* --format llava-video"):
    cli.main(["data", "convert", "--format", "llava-video", "--input", str(path), "--out", str(root / "d"),
              "--name", "v"])
  with pytest.raises(SystemExit, match=r"4 of 6 entries are bad .*missing video file 1"):
    cli.main(convert_args(root, path, "strict", "--max-bad-fraction", "0.5"))
  assert isinstance(convert.ConvertError("x"), RuntimeError)
