"""Synthetic UI screens and their Ferret-UI-style task records; the opt-in UI corpus; UI configs."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from mm15_jax.data import records, samples, synth, synth_ui
from mm15_jax.eval import metrics

BACKGROUND = np.array([250, 250, 250])


def _pixels(screen):
  return np.asarray(Image.open(io.BytesIO(screen.png)).convert("RGB")).astype(int)


def _px_box(screen, box):
  w, h = screen.width, screen.height
  return round(box[0] * w / 1000), round(box[1] * h / 1000), round(box[2] * w / 1000), round(box[3] * h / 1000)


def _screens():
  return [synth_ui.random_screen(np.random.default_rng(seed), kind=kind)
          for seed in range(6) for kind in synth_ui.KINDS]


def test_boxes_lie_inside_the_screen_and_on_their_element():
  for screen in _screens():
    pixels = _pixels(screen)
    assert pixels.shape[:2] == (screen.height, screen.width)
    for e in screen.elements:
      x1, y1, x2, y2 = e.box
      assert 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000, e
      px1, py1, px2, py2 = _px_box(screen, e.box)
      region = pixels[py1:py2, px1:px2]
      assert region.size and np.abs(region - BACKGROUND).sum(-1).max() > 60, e  # something is drawn there
      if e.type == "text" and e.box[1] > 130 and not screen.dialog:  # dark text on the light page
        lo_x, lo_y = max(0, px1 - 3), max(0, py1 - 3)
        ink = np.abs(pixels[lo_y:py2 + 3, lo_x:px2 + 3] - BACKGROUND).sum(-1) > 60
        ys, xs = np.nonzero(ink)
        ink_box = (xs.min() + lo_x, ys.min() + lo_y, xs.max() + 1 + lo_x, ys.max() + 1 + lo_y)
        assert np.abs(np.array(ink_box) - np.array((px1, py1, px2, py2))).max() <= 2, (e, ink_box)


def test_every_element_type_appears_and_screens_come_in_both_orientations():
  screens = _screens()
  assert {e.type for s in screens for e in s.elements} == set(synth_ui.ELEMENT_TYPES)
  assert {s.width > s.height for s in screens} == {True, False}
  assert {e.text for s in screens for e in s.of_type("icon")} <= set(synth_ui.ICONS)


def test_screens_are_deterministic_by_seed_and_drawn_at_the_configured_size():
  a = synth_ui.random_screen(np.random.default_rng(7))
  b = synth_ui.random_screen(np.random.default_rng(7))
  c = synth_ui.random_screen(np.random.default_rng(8))
  assert a == b and a.png != c.png
  phone = synth_ui.random_screen(np.random.default_rng(0), "phone", kind="login")
  assert sorted((phone.width, phone.height)) == [1080, 1920]
  small = synth_ui.random_screen(np.random.default_rng(0), "small", kind="login")
  assert sorted((small.width, small.height)) == [180, 320]
  assert [e.type for e in phone.elements] == [e.type for e in small.elements]


def _element_at(screen, box_str):
  box = tuple(json.loads(box_str))
  return [e for e in screen.elements if e.box == box]


def test_task_answers_agree_with_the_screen():
  for seed in range(10):
    rng = np.random.default_rng(seed)
    screen = synth_ui.random_screen(rng)
    q, a = synth_ui.ocr_qa(screen, rng)
    assert a in [e.text for e in _element_at(screen, q[q.index("["):q.index("]") + 1])]
    q, a = synth_ui.widget_qa(screen, rng)
    assert a in [e.type for e in _element_at(screen, q[q.index("["):q.index("]") + 1])]
    q, a = synth_ui.ground_qa(screen, rng)
    (found,) = _element_at(screen, a)  # the box names one element ...
    named = q.split('"')[1] if '"' in q else q.split("the ")[1].split(" icon")[0].split("?")[0]
    assert named in (found.text, found.type)  # ... the one the question names
    assert metrics.grounding_accuracy(a, [a]) == 1.0
    for description in synth_ui.descriptions(screen):
      assert screen.app in description


def test_records_of_every_task_decode_with_held_out_metrics():
  for name, (maker, n_train, n_test) in synth_ui.datasets().items():
    for split in ("train", "test") if n_test else ("train",):
      record = maker(np.random.default_rng(0), split)
      decoded = records.decode_record(records.encode_record(record), where=name)
      assert decoded["category"] == "ui" and decoded["source"] == name and len(decoded["images"]) == 1
      for m in decoded["messages"]:
        samples.check_coordinates(m["content"], name)
      if split == "test":
        assert decoded["metric"] == synth_ui.TASKS[name][1] and decoded["answers"]
        assert [m["role"] for m in decoded["messages"]] == ["user"]
      else:
        assert decoded["messages"][-1]["role"] == "assistant"
  record = synth_ui.datasets()["ui_describe"][0](np.random.default_rng(0), "test")
  assert len(record["answers"]) >= 2  # several reference descriptions for CIDEr-D


def test_ui_datasets_are_opt_in_and_leave_the_default_corpus_alone():
  datasets = {**synth.DATASETS, **synth_ui.datasets()}
  counts = synth.split_counts(0.02, datasets)
  assert synth.split_counts(0.02) == {k: v for k, v in counts.items() if k in synth.DATASETS}
  assert {k for k, v in counts.items() if k.startswith("ui_") and "test" in v} == {
      "ui_ocr", "ui_widget", "ui_icon", "ui_ground", "ui_describe"}
  default = [json.dumps(r, default=len) for r in synth.generate("sft_general", "train", 3, 0)]
  with_ui = [json.dumps(r, default=len) for r in synth.generate("sft_general", "train", 3, 0, datasets)]
  assert default == with_ui
  ui = list(synth.generate("ui_ocr", "test", 2, 0, datasets))
  assert ui == list(synth.generate("ui_ocr", "test", 2, 0, datasets)) and ui[0]["metric"] == "anls"
  with pytest.raises(ValueError, match="UI screen size"):
    synth_ui.datasets("huge")


def test_ui_configs():
  from mm15_jax import errors
  from mm15_jax.cli import load_experiment
  exp = load_experiment("tiny_ui", ["data_dir=/d", "scale=0.1"])
  (stage,) = exp.stages
  assert stage.init_from == "runs/ui/sft/checkpoints" and stage.data.data_dir == "/d" and stage.name == "sft_ui"
  assert abs(sum(stage.data.mixture.values()) - 1) < 1e-9 and set(stage.data.mixture) == set(synth_ui.COUNTS)
  exp = load_experiment("mm15_ui", ["init_from=/ckpt", 'sources={"rico_ui": 2, "ui_ground": 2}'])
  (stage,) = exp.stages
  assert stage.learning_rate == 1e-5 and stage.epochs == 1.0 and stage.image_size == 672
  assert stage.data.mixture == {"rico_ui": 0.5, "ui_ground": 0.5}
  with pytest.raises(errors.UserError, match="init_from"):
    load_experiment("mm15_ui")
