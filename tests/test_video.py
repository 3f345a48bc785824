"""Videos: uniform frame sampling, decoding (OpenCV), video records, their samples and bad-record accounting."""
import io
import logging

import numpy as np
import pytest
from PIL import Image

from mm15_jax.config import DataConfig, SplitConfig, VideoConfig
from mm15_jax.data import pipeline, records, samples, video

T, S = 2, 8
FPS = 5.0


def frame(i, size=(12, 16)):
  """Frame i: flat grey level 20 * i + 10 (distinct after JPEG compression)."""
  return np.full((*size, 3), 20 * i + 10, np.uint8)


def png(pixels):
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def clip():
  """A 10-frame Motion-JPEG AVI at 5 fps (frame i shown at i / 5 s)."""
  return video.encode_frames([frame(i) for i in range(10)], fps=FPS)


def level(pixels):
  return round((float(pixels.mean()) - 10) / 20)


def video_record(images, form="frames", timestamps=None, question="What changed?", answer="the colour"):
  fields = {"form": form} if form == "file" else {"form": form, "timestamps": timestamps}
  return {"kind": "sft", "source": "video_qa", "category": "video", "images": images, "video": fields,
          "messages": [{"role": "user", "content": f"<video>\n{question}"},
                       {"role": "assistant", "content": answer}]}


def spec(frames=24, timestamps=True, max_images=32, seq_len=512, mode="dynamic"):
  split = SplitConfig(mode=mode, n_min=2, n_max=4)
  return samples.SampleSpec(split=split, tile_size=S, tokens_per_tile=T, seq_len=seq_len, max_images=max_images,
                            max_pixels=10**6, video_frames=frames, video_timestamps=timestamps)


def test_sample_indices_uniform_in_order_and_all_frames_of_short_videos():
  assert video.sample_indices(10, 4) == [1, 3, 6, 8]
  assert video.sample_indices(240, 24) == list(range(5, 240, 10))  # the middle of each 10-frame segment
  assert video.sample_indices(5, 24) == [0, 1, 2, 3, 4] and video.sample_indices(0, 24) == []
  for n_total, n in ((25, 24), (1000, 7), (3, 3)):
    picked = video.sample_indices(n_total, n)
    assert len(picked) == min(n, n_total) and picked == sorted(set(picked)) and 0 <= picked[0] <= picked[-1] < n_total
  with pytest.raises(ValueError, match="data.video.frames"):
    video.sample_indices(10, 0)


def test_decode_video_samples_frames_with_timestamps(clip):
  frames = video.decode_video(clip, 4, max_pixels=10**6)
  assert [level(p) for p in frames.pixels] == [1, 3, 6, 8]
  assert frames.timestamps == pytest.approx([0.2, 0.6, 1.2, 1.6])
  assert all(p.shape == (12, 16, 3) and p.dtype == np.uint8 for p in frames.pixels)
  short = video.decode_video(clip, 24, max_pixels=10**6)  # fewer frames than asked: all of them
  assert [level(p) for p in short.pixels] == list(range(10))
  assert short.timestamps == pytest.approx([i / FPS for i in range(10)])


def test_decode_video_colour_order_is_rgb():
  red = np.zeros((16, 16, 3), np.uint8)
  red[..., 0] = 250
  pixels = video.decode_video(video.encode_frames([red] * 2, fps=2), 1, max_pixels=10**6).pixels[0]
  assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50


@pytest.mark.parametrize("raw", [b"", b"not a video" * 50, "truncated"])
def test_corrupt_or_empty_videos_raise_naming_the_record(clip, raw):
  raw = clip[:300] if raw == "truncated" else raw
  with pytest.raises(ValueError, match=r"^clip\[3\] video: "):
    video.record_frames(video_record([raw], form="file"), 24, max_pixels=10**6, where="clip[3]")


def test_decode_video_guards_frame_size(clip):
  with pytest.raises(ValueError, match="max_image_pixels=100"):
    video.decode_video(clip, 2, max_pixels=100)


def test_video_records_round_trip_both_forms(tmp_path, clip):
  frames_form = video_record([png(frame(i)) for i in range(3)], timestamps=[0.0, 0.5, 1.0])
  file_form = video_record([clip], form="file")
  records.write_source(str(tmp_path), "video_qa", {"train": [frames_form, file_form]})
  source = records.open_source(str(tmp_path), "video_qa", "train")
  assert source[0]["video"] == {"form": "frames", "timestamps": [0.0, 0.5, 1.0]} and len(source[0]["images"]) == 3
  assert source[1]["video"] == {"form": "file"} and source[1]["images"] == [clip]


@pytest.mark.parametrize("change, message", [
    (lambda r: dict(r, video={"form": "gif"}), "form one of"),
    (lambda r: dict(r, video={"form": "frames", "timestamps": [0.0, 1.0]}), "one entry per frame"),
    (lambda r: dict(r, video={"form": "frames", "timestamps": [0.0, 2.0, 1.0]}), "temporal order"),
    (lambda r: dict(r, video={"form": "file"}), "stores the file as its one image"),
    (lambda r: dict(r, messages=[{"role": "user", "content": "<video><video>"}, r["messages"][1]]),
     "one <video> marker"),
    (lambda r: dict(r, messages=[{"role": "user", "content": "<video><image>"}, r["messages"][1]]),
     "no <image> marker"),
])
def test_invalid_video_records_are_named(change, message):
  good = video_record([png(frame(i)) for i in range(3)], timestamps=[0.0, 0.5, 1.0])
  records.decode_record(records.encode_record(good), where="v[0]")
  with pytest.raises(ValueError, match=rf"^v\[1\]: .*{message}"):
    records.decode_record(records.encode_record(change(good)), where="v[1]")


def unsplit_block(tok, k):
  return [tok.img_start_id, tok.img_id(k)] + [tok.image_id] * T + [tok.img_end_id]


def test_video_sample_frames_in_order_with_index_tokens_and_timestamps(tok):
  stored = video_record([png(frame(i, (20, 8))) for i in range(6)], timestamps=[0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
  s = samples.make_sample(stored, tok, spec(frames=3))
  video_ids = []
  for k, seconds in enumerate(["0.5s", "1.5s", "2.5s"], 1):  # frames 1, 3, 5 of 6
    video_ids += tok.encode(seconds) + unsplit_block(tok, k)
  user = video_ids + tok.encode("\nWhat changed?")
  expected = ([tok.bos_id, tok.role_id("user")] + user + [tok.end_id, tok.role_id("assistant")]
              + tok.encode("the colour") + [tok.end_id, tok.eos_id])
  assert s.ids.tolist() == expected
  assert tok.decode(s.ids[s.loss_mask == 1]) == "the colour"
  # One unsplit tile per frame although the stage splits images dynamically; the 20x8 frame is padded, not stretched.
  assert s.n_tiles == 3 and [level(t[:, :3]) for t in s.tiles] == [1, 3, 5]
  without = samples.make_sample(stored, tok, spec(frames=3, timestamps=False))
  blocks = unsplit_block(tok, 1) + unsplit_block(tok, 2) + unsplit_block(tok, 3)
  assert without.ids.tolist() == expected[:2] + blocks + expected[2 + len(video_ids):]

def test_video_file_and_frames_forms_give_the_same_sample(tok, clip):
  from_file = samples.make_sample(video_record([clip], form="file"), tok, spec(frames=4))
  timestamps = [i / FPS for i in range(10)]
  from_frames = samples.make_sample(video_record([png(frame(i)) for i in range(10)], timestamps=timestamps), tok,
                                    spec(frames=4))
  assert from_file.ids.tolist() == from_frames.ids.tolist()
  assert np.abs(from_file.tiles.astype(int) - from_frames.tiles.astype(int)).max() <= 4  # JPEG in the file
  prompt = samples.encode_prompt(video_record([clip], form="file"), tok, spec(frames=4))
  assert prompt.n_tiles == 4 and prompt.ids[-1] == tok.role_id("assistant")


def test_video_sample_limits(tok, clip):
  with pytest.raises(ValueError, match="over-long sample, 10 tiles > max_images 8"):
    samples.make_sample(video_record([clip], form="file"), tok, spec(max_images=8))
  with pytest.raises(ValueError, match=r"data.video.frames must be in 1..32"):
    spec(frames=33)


def test_corrupt_video_is_a_skipped_counted_named_bad_record(tok, clip, caplog):
  good = [video_record([clip], form="file", answer=f"answer {i}") for i in range(6)]
  good[2] = video_record([clip[:200]], form="file")
  cfg = DataConfig(mixture={"video_qa": 1.0}, seq_len=96, max_images=4, pack=False, max_bad_fraction=1.0,
                   split=SplitConfig(mode="none"), video=VideoConfig(frames=3))
  it = pipeline.make_pipeline(cfg, sources={"video_qa": good}, tokenizer=tok, tokens_per_tile=T, tile_size=S,
                              batch_size=3, read_threads=0)
  with caplog.at_level(logging.WARNING):
    for _ in range(4):  # two epochs of the source
      next(it)
  bad, seen = it.bad_records
  named = [r.getMessage() for r in caplog.records if "video_qa[2]" in r.getMessage()]
  assert bad == len(named) >= 2 and seen == 12 + bad
  assert all("cannot decode video" in m for m in named)


def bits_frame(i):
  """Frame i shows the bits of i as 9 black or white bands (exact after any lossy codec)."""
  pixels = np.zeros((16, 9 * 16, 3), np.uint8)
  for b in range(9):
    pixels[:, b * 16:(b + 1) * 16] = 255 * (i >> b & 1)
  return pixels


def frame_number(pixels):
  return sum(int(pixels[8, b * 16 + 8, 0] > 127) << b for b in range(9))


@pytest.mark.parametrize("fourcc, suffix", [("MJPG", ".avi"), ("mp4v", ".mp4")])
def test_seeking_lands_on_the_sampled_frames(monkeypatch, tmp_path, fourcc, suffix):
  raw = video.encode_frames([bits_frame(i) for i in range(90)], fps=30, suffix=suffix, fourcc=fourcc)
  in_order = video.decode_video(raw, 6, max_pixels=10**6)
  monkeypatch.setattr(video, "SEEK_GAP", 4)  # every gap between the 6 sampled frames (15 frames) is a seek
  seeking = video.decode_video(raw, 6, max_pixels=10**6)
  assert [frame_number(p) for p in seeking.pixels] == [frame_number(p) for p in in_order.pixels] == [
      7, 22, 37, 52, 67, 82]
  assert seeking.timestamps == in_order.timestamps == pytest.approx([i / 30 for i in (7, 22, 37, 52, 67, 82)])
  path = tmp_path / f"clip{suffix}"
  path.write_bytes(raw)
  frames, position = video._read(str(path), [7, 52], "clip", 10**6, seek_gap=4)  # seeks, and lands
  assert {i: frame_number(p) for i, (p, _) in frames.items()} == {7: 7, 52: 52} and position == 53
  assert video._read(str(path), [300], "clip", 10**6, seek_gap=4) is None  # past the end: decode in order instead
