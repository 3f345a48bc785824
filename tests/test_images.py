import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mm15_jax.config import SplitConfig
from mm15_jax.data import images


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, fmt)
  return buf.getvalue()


def random_image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_decode_round_trip_and_rgb():
  pixels = random_image(7, 11)
  np.testing.assert_array_equal(images.decode_image(encode(pixels), max_pixels=1000), pixels)
  gray = np.full((5, 6), 77, np.uint8)
  buf = io.BytesIO()
  Image.fromarray(gray, "L").save(buf, "PNG")
  assert (images.decode_image(buf.getvalue(), max_pixels=1000) == 77).all()
  rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black -> white background
  buf = io.BytesIO()
  Image.fromarray(rgba, "RGBA").save(buf, "PNG")
  assert (images.decode_image(buf.getvalue(), max_pixels=1000) == 255).all()


@pytest.mark.parametrize("raw, message", [
    (b"", "empty"),
    (b"not an image at all", "cannot decode"),
    (encode(random_image(64, 64))[:200], "cannot decode"),  # truncated
])
def test_decode_errors_name_the_record(raw, message):
  with pytest.raises(ValueError, match=rf"rec\[3\].*{message}"):
    images.decode_image(raw, max_pixels=10**6, where="rec[3]")


def test_decompression_bomb_guard():
  raw = encode(np.zeros((100, 200, 3), np.uint8))
  assert images.decode_image(raw, max_pixels=20_000).shape == (100, 200, 3)
  with pytest.raises(ValueError, match="max_image_pixels=19999"):
    images.decode_image(raw, max_pixels=19_999)


# Worked cases at r = 672, (n_min, n_max) = (4, 9); sizes are (h, w).
@pytest.mark.parametrize("h, w, grid", [
    (672, 2688, (1, 4)),    # wide: exact fit, no padding
    (2688, 672, (4, 1)),    # tall
    (100, 100, (2, 2)),     # tiny: every square grid fits without padding once upscaled; fewest tiles wins
    (1000, 1500, (2, 3)),   # upscaled 1.344x to exactly 1344 x 2016
    (500, 1200, (2, 4)),    # least padding: (2,4) pads 224*2688 = 602112 < (1,4) 672*1075 = 722400
    (4000, 6000, (2, 3)),   # huge: (2,3), (2,4), (3,3) all keep 1344x2016; least padding breaks the tie
    (3000, 1000, (4, 2)),   # no grid avoids downscaling; (4,2) keeps 2688x896, the most pixels
])
def test_choose_grid_worked_cases(h, w, grid):
  assert images.choose_grid(h, w, 672, 4, 9) == grid


def test_inference_n_max_allows_bigger_grids():
  assert images.choose_grid(2688, 2688, 672, 4, 9) == (3, 3)
  assert images.choose_grid(2688, 2688, 672, 4, 16) == (4, 4)


def test_padding_never_stretches():
  pixels = random_image(30, 90)
  tile = images.split_image(pixels, SplitConfig(mode="none"), tile_size=45).tiles
  assert tile.shape == (1, 45, 45, 3)
  expected = np.asarray(Image.fromarray(pixels).resize((45, 15), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(tile[0, :15], expected)  # aspect 1:3 kept, top-left
  assert (tile[0, 15:] == images.PAD_RGB).all()


def test_dynamic_tiles_row_major_and_overview_last():
  r = 16
  pixels = random_image(20, 70, seed=1)
  cfg = SplitConfig(mode="dynamic", n_min=2, n_max=6, overview=True)
  split = images.split_image(pixels, cfg, tile_size=r)
  n_h, n_w = split.grid
  assert (n_h, n_w) == images.choose_grid(20, 70, r, 2, 6)
  assert split.overview and split.tiles.shape == (n_h * n_w + 1, r, r, 3)
  # Reference canvas built directly: aspect-preserving resize into the grid canvas, pad bottom/right.
  h_g, w_g = images.fit_size(20, 70, n_h * r, n_w * r)
  assert abs(h_g / w_g - 20 / 70) < 0.05
  canvas = np.empty((n_h * r, n_w * r, 3), np.uint8)
  canvas[...] = images.PAD_RGB
  canvas[:h_g, :w_g] = np.asarray(Image.fromarray(pixels).resize((w_g, h_g), Image.Resampling.BICUBIC))
  for i in range(n_h):
    for j in range(n_w):
      np.testing.assert_array_equal(split.tiles[i * n_w + j], canvas[i * r:(i + 1) * r, j * r:(j + 1) * r])
  np.testing.assert_array_equal(split.tiles[-1], images.fit_and_pad(pixels, r, r))


def test_static_split_and_no_overview():
  pixels = random_image(40, 40)
  split = images.split_image(pixels, SplitConfig(mode="static", static_grid=2), tile_size=10)
  assert split.grid == (2, 2) and split.tiles.shape == (5, 10, 10, 3)
  split = images.split_image(pixels, SplitConfig(mode="static", static_grid=3, overview=False), tile_size=10)
  assert split.grid == (3, 3) and split.tiles.shape == (9, 10, 10, 3) and not split.overview


def test_multi_image_rule():
  cfg = SplitConfig(mode="dynamic", n_min=4, n_max=4, max_images_to_split=2)
  two = images.split_images([random_image(20, 20)] * 2, cfg, tile_size=8)
  assert [s.tiles.shape[0] for s in two] == [5, 5]
  three = images.split_images([random_image(20, 20)] * 3, cfg, tile_size=8)
  assert [s.tiles.shape[0] for s in three] == [1, 1, 1] and all(s.grid is None for s in three)
  np.testing.assert_array_equal(three[0].tiles[0], two[0].tiles[-1])  # overview only


def test_bad_split_config():
  with pytest.raises(ValueError, match="mode"):
    images.split_image(random_image(4, 4), SplitConfig(mode="anyres"), tile_size=4)
  with pytest.raises(ValueError, match="n_min"):
    images.choose_grid(4, 4, 4, 5, 4)


def natural_image(h, w, seed=0):
  """A photo/scan-like test image: smooth colour field, flat boxes with sharp edges, text strokes, sensor grain."""
  rng = np.random.default_rng(seed)
  field = rng.integers(0, 256, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
  im = Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC)
  draw = ImageDraw.Draw(im)
  for _ in range(30):
    x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
    box = [x0, y0, x0 + int(rng.integers(4, w // 4)), y0 + int(rng.integers(4, h // 4))]
    draw.rectangle(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
  for _ in range(20):
    draw.text((int(rng.integers(0, w)), int(rng.integers(0, h))), "Invoice 2024: total 1,234.56", fill=(0, 0, 0))
  grain = rng.normal(0, 4, (h, w, 3))
  return np.clip(np.asarray(im) + grain, 0, 255).astype(np.uint8)


def reference_split(pixels, grid, tile):
  """Tiles computed the direct way: one bicubic resize, a padded canvas, cut row-major, overview last."""
  def fit(canvas_h, canvas_w):
    h_g, w_g = images.fit_size(*pixels.shape[:2], canvas_h, canvas_w)
    canvas = np.empty((canvas_h, canvas_w, 3), np.uint8)
    canvas[...] = images.PAD_RGB
    canvas[:h_g, :w_g] = np.asarray(Image.fromarray(pixels).resize((w_g, h_g), Image.Resampling.BICUBIC))
    return canvas
  n_h, n_w = grid
  tiles = fit(n_h * tile, n_w * tile).reshape(n_h, tile, n_w, tile, 3).transpose(0, 2, 1, 3, 4)
  return np.concatenate([tiles.reshape(n_h * n_w, tile, tile, 3), fit(tile, tile)[None]])


@pytest.mark.parametrize("h, w, cfg", [
    (290, 200, SplitConfig(mode="static", static_grid=2)),   # grid canvas shrinks 1.45x, the overview 2.9x
    (60, 170, SplitConfig(mode="static", static_grid=3)),    # the bottom tile row is all padding
    (70, 260, SplitConfig(mode="dynamic", n_min=2, n_max=6)),  # wide, upscaled into the grid
    (200, 200, SplitConfig(mode="dynamic", n_min=4, n_max=4)),  # exact fit: the grid canvas is not resized
])
def test_split_equals_direct_reference_below_reducing_shrink(h, w, cfg):
  tile = 100
  pixels = natural_image(h, w, seed=h)
  assert max(h, w) / tile < 2 * images.REDUCING_GAP  # no resize here shrinks enough to be reduced first
  split = images.split_image(pixels, cfg, tile_size=tile)
  np.testing.assert_array_equal(split.tiles, reference_split(pixels, split.grid, tile))


def test_large_shrinks_are_close_to_exact_bicubic():
  # A 200 dpi page and the paper's 672 px tiles, both scaled by 1/4: grid canvas shrink 1.64 (exact),
  # overview shrink 3.3 (2x2 blocks averaged first, then bicubic).
  pixels, tile = natural_image(550, 425, seed=3), 168
  split = images.split_image(pixels, SplitConfig(mode="static", static_grid=2), tile_size=tile)
  reference = reference_split(pixels, (2, 2), tile)
  assert split.tiles.shape == reference.shape == (5, tile, tile, 3) and split.grid == (2, 2)
  np.testing.assert_array_equal(split.tiles[:4], reference[:4])
  # Overview: same fitted size (aspect kept), same padding, pixels about 1 level (of 255) apart on average: on this
  # image exact bilinear differs from exact bicubic as much, one JPEG q90 re-encode 5x more (measured 0.9-1.0 over
  # seeds 0-3; the 99th percentile 9-10 levels, on text edges).
  h_g, w_g = images.fit_size(550, 425, tile, tile)
  overview, exact = split.tiles[4].astype(int), reference[4].astype(int)
  assert (h_g, w_g) == (168, 130)
  assert (split.tiles[4, :, w_g:] == images.PAD_RGB).all()
  assert not (split.tiles[4, :, w_g - 1] == images.PAD_RGB).all(axis=-1).any()
  diff = np.abs(overview - exact)[:h_g, :w_g]
  assert 0 < diff.mean() < 1.5, diff.mean()  # > 0: the reduced path was taken
  assert np.percentile(diff, 99) <= 12
  # Unsplit (mode "none"): the same 3.3x shrink, the same pixels as the overview.
  np.testing.assert_array_equal(images.split_image(pixels, SplitConfig(mode="none"), tile_size=tile).tiles[0],
                                split.tiles[4])


def test_decode_jpeg_matches_pil():
  raw = encode(natural_image(40, 60), "JPEG")
  expected = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
  np.testing.assert_array_equal(images.decode_image(raw, max_pixels=10**4), expected)
