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
