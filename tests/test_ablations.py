"""The paper's ablation switches as config data: overview position, tile markers, SFT mixtures."""
import io

import numpy as np
import pytest
from PIL import Image

from mm15_jax.data import images as images_lib
from mm15_jax.data import samples
from tests.test_samples import T, spec


def quadrants_png():
  """16 x 16: red, green / blue, white quadrants (each 2x2 grid tile one colour)."""
  pixels = np.zeros((16, 16, 3), np.uint8)
  pixels[:8, :8], pixels[:8, 8:], pixels[8:, :8], pixels[8:, 8:] = (255, 0, 0), (0, 255, 0), (0, 0, 255), 255
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "PNG")
  return buf.getvalue()


def image_ids(tok, s):
  return s.ids[s.loss_mask == 0].tolist()[1:]  # after BOS


@pytest.mark.parametrize("overview_first", [False, True])
def test_overview_position(tok, overview_first):
  record = {"kind": "ocr", "images": [quadrants_png()], "text": "q"}
  s = samples.make_sample(record, tok, spec("static", static_grid=2, overview_first=overview_first))
  r, c, tile = tok.row_id, tok.col_id, [tok.image_id] * T
  grid = [r(1), c(1)] + tile + [r(1), c(2)] + tile + [r(2), c(1)] + tile + [r(2), c(2)] + tile
  overview = [tok.overview_id] + tile
  body = overview + grid if overview_first else grid + overview
  assert image_ids(tok, s) == [tok.img_start_id, tok.img_id(1)] + body + [tok.img_end_id]
  # Tiles follow their placeholders: the overview (a quarter of each colour) first or last.
  colours = [tuple(t[2, 2]) for t in s.tiles]
  grid_colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
  overview_at = 0 if overview_first else 4
  assert [colours[i] for i in range(5) if i != overview_at] == grid_colours
  assert colours[overview_at] == (255, 0, 0)  # its top-left quarter is the red quadrant
  assert tuple(s.tiles[overview_at][6, 6]) == (255, 255, 255)


def test_separator_markers(tok):
  record = {"kind": "ocr", "images": [quadrants_png()], "text": "q"}
  s = samples.make_sample(record, tok, spec("static", static_grid=2, tile_markers="separator"))
  tile, comma, newline = [tok.image_id] * T, tok.encode(","), tok.encode("\n")
  assert comma and newline
  grid = tile + comma + tile + newline + tile + comma + tile
  assert image_ids(tok, s) == ([tok.img_start_id, tok.img_id(1)] + grid + [tok.overview_id] + tile
                               + [tok.img_end_id])
  with pytest.raises(ValueError, match="data.split.tile_markers must be one of"):
    samples.make_sample(record, tok, spec("static", tile_markers="commas"))
  assert images_lib.TILE_MARKERS == ("index", "separator")


# --- SFT mixtures as config data --------------------------------------------------------------------------------

from mm15_jax import config as config_lib  # noqa: E402
from mm15_jax.config import DataConfig, Experiment, StageConfig  # noqa: E402
from mm15_jax.data import mixture, records  # noqa: E402


def test_general_plus_x_and_overrides():
  cats = {"g": "general", "m": "math", "t": "text_rich", "x": "text_only"}
  assert mixture.sft_mixture("general+math", cats) == pytest.approx({"g": 1 / 1.5, "m": 0.5 / 1.5})
  got = mixture.sft_mixture("general+text_rich+text_only", cats, {**mixture.SFT_ALPHA, "text_rich": 1.0},
                            {**mixture.SFT_GROUPS, "text_only": 0.2})
  # single-image 0.8 and text-only 0.2, renormalised over the groups present (1.0); general = text_rich inside
  assert got == pytest.approx({"g": 0.4, "t": 0.4, "x": 0.2})
  with pytest.raises(ValueError, match=r"unknown SFT mixture 'general\+poetry'.*\['poetry'\]"):
    mixture.sft_mixture("general+poetry", cats)


def test_several_datasets_per_category_weighted_by_size():
  cats = {"g1": "general", "g2": "general", "m": "math"}
  sizes = {"g1": 300, "g2": 100, "m": 50}
  got = mixture.sft_mixture("general+math", cats, sizes=sizes)
  assert got == pytest.approx({"g1": 0.75 / 1.5, "g2": 0.25 / 1.5, "m": 0.5 / 1.5})
  equal = mixture.sft_mixture("general+math", cats)
  assert equal["g1"] == equal["g2"] == pytest.approx(0.5 / 1.5)


def _sft(category, n):
  return [{"kind": "sft", "source": "s", "category": category, "images": [],
           "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * n


def test_resolved_at_start_from_the_data_dir_and_reachable_with_set(tmp_path):
  data_dir = str(tmp_path)
  records.write_source(data_dir, "vqa_a", {"train": _sft("general", 6)})
  records.write_source(data_dir, "vqa_b", {"train": _sft("general", 2)})
  records.write_source(data_dir, "charts", {"train": _sft("text_rich", 4)})
  records.write_source(data_dir, "captions", {"train": [{"kind": "text", "source": "c", "text": "t", "images": []}]})
  records.write_source(data_dir, "heldout", {"test": _sft("general", 1)})
  exp = Experiment(stages=[StageConfig(name="sft", data=DataConfig(data_dir=data_dir, mixture={"old": 1.0}))])
  config_lib.override(exp, ["stages.sft.data.sft.name=general+text_rich", "stages.sft.data.sft.alpha.text_rich=1.0"])
  assert mixture.discover_sft_sources(data_dir) == {"charts": "text_rich", "vqa_a": "general", "vqa_b": "general"}
  log = []
  data = mixture.resolve_sft(exp.stages[0].data, log=log.append)
  assert data.mixture == pytest.approx({"charts": 0.5, "vqa_a": 0.375, "vqa_b": 0.125})
  assert "over 3 datasets" in log[0]
  config_lib.override(exp, ["stages.sft.data.sft.within=equal", 'stages.sft.data.sft.sources={"vqa_a": "general", '
                            '"charts": "text_rich"}'])
  assert mixture.resolve_sft(exp.stages[0].data, log=log.append).mixture == pytest.approx({"charts": 0.5,
                                                                                           "vqa_a": 0.5})
  config_lib.override(exp, ["stages.sft.data.sft.alpha.poetry=1.0"])
  with pytest.raises(ValueError, match=r"data.sft.alpha: unknown \['poetry'\]"):
    mixture.resolve_sft(exp.stages[0].data)
  assert mixture.resolve_sft(DataConfig(mixture={"a": 1.0})).mixture == {"a": 1.0}  # no name: unchanged
