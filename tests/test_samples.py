import io

import numpy as np
import pytest
from PIL import Image

from mm15_jax.config import SplitConfig
from mm15_jax.data import images as images_lib
from mm15_jax.data import samples

T = 3  # tokens per tile
def png(h, w, color):
  buf = io.BytesIO()
  Image.new("RGB", (w, h), color).save(buf, "PNG")
  return buf.getvalue()


def spec(mode="none", seq_len=256, max_images=16, **split):
  return samples.SampleSpec(split=SplitConfig(mode=mode, **split), tile_size=8, tokens_per_tile=T,
                            seq_len=seq_len, max_images=max_images, max_pixels=10**6)


def trained_text(tok, s):
  return tok.decode(s.ids[s.loss_mask == 1])


def unsplit_block(tok, k):
  return [tok.img_start_id, tok.img_id(k)] + [tok.image_id] * T + [tok.img_end_id]


def test_caption(tok):
  record = {"kind": "caption", "images": [png(10, 20, (255, 0, 0))], "text": "a red box"}
  s = samples.make_sample(record, tok, spec())
  expected = [tok.bos_id] + unsplit_block(tok, 1) + tok.encode("a red box") + [tok.eos_id]
  assert s.ids.tolist() == expected and s.ids.dtype == np.int32
  assert s.loss_mask.tolist() == [0] * (1 + len(unsplit_block(tok, 1))) + [1] * (len(expected) - 7)
  assert s.tiles.shape == (1, 8, 8, 3) and (s.tiles[0, 0, 0] == (255, 0, 0)).all()


def test_text_and_ocr(tok):
  s = samples.make_sample({"kind": "text", "images": [], "text": "the dog sat"}, tok, spec())
  assert s.ids.tolist() == [tok.bos_id] + tok.encode("the dog sat") + [tok.eos_id]
  assert s.loss_mask.tolist() == [0] + [1] * (len(s.ids) - 1) and s.tiles.shape == (0, 8, 8, 3)
  record = {"kind": "ocr", "images": [png(16, 16, (0, 0, 0))], "text": "chart table\nnumber"}
  s = samples.make_sample(record, tok, spec("static", static_grid=2))
  assert s.tiles.shape == (5, 8, 8, 3)
  assert trained_text(tok, s) == "chart table\nnumber"
  image_part = s.ids[s.loss_mask == 0].tolist()
  r, c = tok.row_id, tok.col_id
  tile = [tok.image_id] * T
  assert image_part == [tok.bos_id, tok.img_start_id, tok.img_id(1), r(1), c(1)] + tile + [r(1), c(2)] + tile + [
      r(2), c(1)] + tile + [r(2), c(2)] + tile + [tok.overview_id] + tile + [tok.img_end_id]


def test_interleaved_images_in_placeholder_order(tok):
  red, blue = png(8, 8, (255, 0, 0)), png(8, 8, (0, 0, 255))
  record = {"kind": "interleaved", "images": [red, blue], "segments": ["the cat", 1, "sat on", 0, "a mat"]}
  s = samples.make_sample(record, tok, spec())
  expected = ([tok.bos_id] + tok.encode("the cat") + unsplit_block(tok, 1) + tok.encode("sat on")
              + unsplit_block(tok, 2) + tok.encode("a mat") + [tok.eos_id])
  assert s.ids.tolist() == expected
  assert trained_text(tok, s) == tok.decode(tok.encode("the cat") + tok.encode("sat on") + tok.encode("a mat"))
  assert (s.tiles[0] == (0, 0, 255)).all() and (s.tiles[1] == (255, 0, 0)).all()  # blue first, as referenced


def test_sft_trains_assistant_turns_only(tok):
  record = {"kind": "sft", "images": [png(8, 8, (0, 255, 0))], "messages": [
      {"role": "user", "content": "<image>what color"}, {"role": "assistant", "content": "green"},
      {"role": "user", "content": "and the box"}, {"role": "assistant", "content": "red box"}]}
  s = samples.make_sample(record, tok, spec())
  trained = s.ids[s.loss_mask == 1].tolist()
  assert trained == tok.encode("green") + [tok.end_id] + tok.encode("red box") + [tok.end_id, tok.eos_id]
  assert s.ids[0] == tok.bos_id and s.ids[-1] == tok.eos_id and len(s.tiles) == 1
  assert s.ids.tolist()[1:4] == [tok.role_id("user"), tok.img_start_id, tok.img_id(1)]


def test_boxes_unchanged_by_splitting_and_checked(tok):
  text = "the box [120, 40, 880, 1000] and the dog [5, 7]"
  record = {"kind": "sft", "images": [png(30, 90, (9, 9, 9))], "messages": [
      {"role": "user", "content": "<image>where"}, {"role": "assistant", "content": text}]}
  decoded = set()
  for mode in ("none", "static", "dynamic"):
    s = samples.make_sample(record, tok, spec(mode, n_min=2, n_max=4))
    decoded.add(tok.decode(s.ids[s.loss_mask == 1]))
  assert decoded == {text}
  record["messages"][1]["content"] = "the box [120, 40, 1001, 200]"
  with pytest.raises(ValueError, match=r"rec\[9\]: coordinates \[120, 40, 1001, 200\] outside"):
    samples.make_sample(record, tok, spec(), where="rec[9]")


def test_bad_records_raise_naming_the_record(tok):
  ok = {"kind": "caption", "images": [png(8, 8, (1, 2, 3))], "text": "a cat"}
  cases = [
      ({"kind": "caption", "images": ok["images"]}, "missing field 'text'"),
      ({"kind": "poem", "images": [], "text": "x"}, "unknown kind"),
      (dict(ok, images=[b""]), "empty image bytes"),
      (dict(ok, images=[b"garbage"]), "cannot decode"),
      (dict(ok, text="the cat " * 200), "over-long sample"),
      ({"kind": "interleaved", "images": [], "segments": ["x", 2]}, "image index 2"),
      ({"kind": "sft", "images": [], "messages": [{"role": "user", "content": "<image>hi"},
                                                  {"role": "assistant", "content": "hi"}]}, "1 '<image>' marks"),
  ]
  for record, message in cases:
    with pytest.raises(ValueError, match=rf"src\[4\].*{message}"):
      samples.make_sample(record, tok, spec(seq_len=64), where="src[4]")
  with pytest.raises(ValueError, match="10 tiles > max_images 8"):
    two = {"kind": "interleaved", "images": [ok["images"][0]] * 2, "segments": [0, "a", 1]}
    samples.make_sample(two, tok, spec("static", max_images=8, static_grid=2), where="src[4]")


def test_length_limit_is_exact(tok):
  record = {"kind": "text", "images": [], "text": "the cat sat on a mat"}
  n_ids = len(tok.encode(record["text"])) + 2
  assert len(samples.make_sample(record, tok, spec(seq_len=n_ids - 1)).ids) == n_ids
  with pytest.raises(ValueError, match="over-long"):
    samples.make_sample(record, tok, spec(seq_len=n_ids - 2))


def test_encode_prompt(tok):
  big = png(64, 64, (200, 10, 10))
  record = {"kind": "sft", "images": [big], "messages": [
      {"role": "user", "content": "<image>what"}, {"role": "assistant", "content": "red"},
      {"role": "user", "content": "and the box"}, {"role": "assistant", "content": "blue box"}]}
  cfg = spec("dynamic", n_min=1, n_max=4, max_images=32)
  prompt = samples.encode_prompt(record, tok, cfg)
  ids, tiles = prompt.ids, prompt.tiles
  assert ids[0] == tok.bos_id and ids[-1] == tok.role_id("assistant") and tok.eos_id not in ids.tolist()
  assert "blue" not in tok.decode(ids) and tok.decode(ids).endswith("and the box")
  assert len(tiles) == 4 + 1
  prompt16 = samples.encode_prompt(record, tok, cfg, n_max=16)
  ids16, tiles16 = prompt16.ids, prompt16.tiles
  assert len(tiles16) == 16 + 1 and images_lib.choose_grid(64, 64, 8, 1, 16) == (4, 4)
  assert (ids16 == tok.image_id).sum() == 17 * T
