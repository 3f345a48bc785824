"""Video data: the LLaVA-Video converter on fixtures written here, and the synthetic video corpus."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from mm15_jax import cli
from mm15_jax.config import SplitConfig
from mm15_jax.data import convert, records, samples, synth, synth_scenes, synth_video, video


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
  root, path = llava_video
  cli.main(convert_args(root, path, "video_frames", "--video-frames", "2"))
  recs = list(records.open_source(str(root / "data"), "video_frames", "train"))
  assert recs[0]["video"] == {"form": "frames", "timestamps": [0.5, 1.5]}  # frames 1 and 3 of 5 at 2 fps
  assert recs[1]["video"]["timestamps"] == [0.0, 1.0]
  spec = samples.SampleSpec(split=SplitConfig(mode="none"), tile_size=8, tokens_per_tile=2,
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


def _colours_at(png_bytes):
  """Palette colours (synth_scenes.COLORS) present in a frame, by pixel count."""
  pixels = np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB")).reshape(-1, 3)
  return {name: int((pixels == rgb).all(1).sum()) for name, rgb in synth_scenes.COLORS.items()
          if (pixels == rgb).all(1).any()}


def _centroid(png_bytes, colour):
  pixels = np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB"))
  ys, xs = np.nonzero((pixels == synth_scenes.COLORS[colour]).all(-1))
  return xs.mean(), ys.mean()


def test_synthetic_video_questions_match_their_clips():
  recs = list(synth.generate("video_qa", "test", 60, seed=3))
  assert recs == list(synth.generate("video_qa", "test", 60, seed=3))  # a pure function of the seed
  assert {r["subset"] for r in recs} == set(synth_video.TASKS)
  for r in recs:
    records.decode_record(records.encode_record(r), where="video_qa")
    assert r["video"]["timestamps"] == [k / synth_video.FPS for k in range(synth_video.FRAMES)]
    question = r["messages"][0]["content"].split("\n")
    options = {line[0]: line[3:] for line in question[2:-1]}
    answer, frames = options[r["answers"][0]], r["images"]
    if r["subset"] == "direction":
      colour = question[1].split()[-3]
      (x0, y0), (x1, y1) = _centroid(frames[0], colour), _centroid(frames[-1], colour)
      moved = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}
      assert max(moved, key=moved.get) == answer and moved[answer] > 10
    elif r["subset"] == "colour":
      frame = frames[0] if question[1].endswith("at the start?") else frames[-1]
      assert list(_colours_at(frame)) == [answer]
    elif r["subset"] == "count":
      at = question[1].split()[-1].rstrip("?")
      frame = frames[-1] if at == "end" else frames[int(float(at[:-1]) * synth_video.FPS)]
      assert len(_colours_at(frame)) == ("one", "two", "three", "four").index(answer) + 1
    elif r["subset"] == "order":
      first_seen = {}
      for k, frame in enumerate(frames):
        for colour in _colours_at(frame):
          first_seen.setdefault(colour, k)
      order = sorted(first_seen, key=first_seen.get)
      assert answer.split()[0] == (order[0] if "first" in question[1] else order[-1])
    else:  # "Does the <colour> <shape> appear before or after the <shape> turns <colour>?"
      words = question[1].rstrip("?").split()
      appear, turned = words[2], words[-1]
      seen = [_colours_at(frame) for frame in frames]
      first = lambda colour: next(k for k, colours in enumerate(seen) if colour in colours)
      assert ("before" if first(appear) < first(turned) else "after") == answer


def test_video_synth_option_keeps_the_image_corpus(tmp_path):
  assert "video_qa" not in synth.split_counts(1.0)  # the default corpus is unchanged
  (tmp_path / synth.CORPUS_FILE).write_text(json.dumps({"seed": 0, "scale": 0.01, "datasets": {}}))
  cli.main(["data", "synth", "--out", str(tmp_path), "--scale", "0.01", "--video"])
  corpus = json.loads((tmp_path / synth.CORPUS_FILE).read_text())
  assert corpus["video_datasets"] == {"video_qa": {"train": 20, "test": 2}} and corpus["datasets"] == {}
  assert not (tmp_path / synth.TOKENIZER_FILE).exists()  # the image corpus's tokenizer is not retrained
  train = records.open_source(str(tmp_path), "video_qa", "train")
  assert len(train) == 20 and train[0]["messages"][1]["content"] in "ABCDE"
  test = records.open_source(str(tmp_path), "video_qa", "test")
  assert test[0]["metric"] == "mc" and test[0]["category"] == "video"
  assert len(test[0]["images"]) == synth_video.FRAMES


def test_video_configs_follow_the_recipe_and_fit_their_rows(tok):
  exp = cli.load_experiment("mm15_video", ["init_from=ckpt/sft"], [])
  (stage,) = exp.stages
  assert (stage.batch_size, stage.learning_rate, stage.warmup_fraction, stage.end_lr_fraction, stage.epochs) == (
      256, 1e-5, 0.01, 0.0, 1.0)
  assert (stage.init_from, stage.image_size, stage.data.split.mode, stage.data.video.frames) == (
      "ckpt/sft", 378, "none", 24)
  tokens_per_tile = exp.model.tokens_per_tile
  assert tokens_per_tile == 144 and stage.data.max_images >= 24
  frames = [video.encode_frames([np.zeros((8, 8, 3), np.uint8)] * 48, fps=24)]
  record = {"kind": "sft", "source": "v", "images": frames, "video": {"form": "file"},
            "messages": [{"role": "user", "content": "<video>\n" + "What happens in the video? " * 4},
                         {"role": "assistant", "content": "Nothing moves. " * 10}]}
  spec = samples.SampleSpec.from_config(stage.data, tile_size=stage.image_size, tokens_per_tile=tokens_per_tile)
  sample = samples.make_sample(record, tok, spec)  # 24 frames of 144 tokens fit one 4096-token row
  assert sample.n_tiles == 24 and 24 * 144 < len(sample.ids) <= stage.data.seq_len + 1

  tiny_exp = cli.load_experiment("tiny_video", ["data_dir=d", "init_from=runs/x/sft/checkpoints"], [])
  (tiny_stage,) = tiny_exp.stages
  assert (tiny_stage.init_from, tiny_stage.data.mixture, tiny_stage.data.video.frames) == (
      "runs/x/sft/checkpoints", {"video_qa": 1.0}, synth_video.FRAMES)
  clip = next(synth.generate("video_qa", "train", 1, seed=0))
  tiny_spec = samples.SampleSpec.from_config(tiny_stage.data, tile_size=tiny_stage.image_size,
                                             tokens_per_tile=tiny_exp.model.tokens_per_tile)
  sample = samples.make_sample(clip, tok, tiny_spec)
  assert sample.n_tiles == synth_video.FRAMES
  assert 2 * len(sample.ids) <= tiny_stage.data.seq_len  # two clips or more per packed row
  # the image slots do not close a row before its tokens do
  assert tiny_stage.data.max_images >= (tiny_stage.data.seq_len // len(sample.ids)) * sample.n_tiles


def test_video_synth_builds_the_same_image_corpus_and_tokenizer(tmp_path):
  synth.build_corpus(tmp_path / "image", scale=0.005, progress=None)
  cli.main(["data", "synth", "--out", str(tmp_path / "video"), "--scale", "0.005", "--video"])
  for name in (synth.TOKENIZER_FILE, "sft_general/1.0.0/sft_general-test.array_record-00000-of-00001",
               "caption/1.0.0/caption-train.array_record-00000-of-00001"):
    assert (tmp_path / "image" / name).read_bytes() == (tmp_path / "video" / name).read_bytes(), name
  image_corpus = json.loads((tmp_path / "image" / synth.CORPUS_FILE).read_text())
  video_corpus = json.loads((tmp_path / "video" / synth.CORPUS_FILE).read_text())
  assert video_corpus == {**image_corpus, "video_datasets": {"video_qa": {"train": 10, "test": 1}}}
