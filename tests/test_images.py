import dataclasses
import io
import platform
import subprocess
import sys

import cv2
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


@pytest.mark.parametrize("resample", images.RESAMPLE_MODES)
def test_padding_never_stretches(resample):
  pixels = random_image(30, 90)
  tile = images.split_image(pixels, SplitConfig(mode="none", resample=resample), tile_size=45).tiles
  assert tile.shape == (1, 45, 45, 3)
  assert_resampled(tile[0, :15], reference_resize(pixels, 15, 45, resample), resample)  # aspect 1:3, top-left
  assert (tile[0, 15:] == images.PAD_RGB).all()


def one_tile(pixels, tile, resample):
  """The image fitted into one tile x tile square and padded: the tile of an unsplit image (mode "none")."""
  return images.split_image(pixels, SplitConfig(mode="none", resample=resample), tile_size=tile).tiles[0]


def test_dynamic_tiles_row_major_and_overview_last():
  r = 16
  pixels = random_image(20, 70, seed=1)
  cfg = SplitConfig(mode="dynamic", n_min=2, n_max=6, overview=True, resample="antialias")
  split = images.split_image(pixels, cfg, tile_size=r)
  n_h, n_w = split.grid
  assert (n_h, n_w) == images.choose_grid(20, 70, r, 2, 6) == (1, 4)
  assert split.overview and split.tiles.shape == (n_h * n_w + 1, r, r, 3)
  # Reference built directly: the image cut into 20 x 20 blocks (the height binds: 20 > ceil(70 / 4)), each resized
  # by 16/20 onto the top-left of its tile, the last (10 px wide) padded at the right.
  assert split.block == 20
  for j in range(n_w):
    block = pixels[:, j * 20:(j + 1) * 20]
    h, w = r, round(block.shape[1] * r / 20)
    tile = np.empty((r, r, 3), np.uint8)
    tile[...] = images.PAD_RGB
    tile[:h, :w] = np.asarray(Image.fromarray(block).resize((w, h), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(split.tiles[j], tile)
  np.testing.assert_array_equal(split.tiles[-1], one_tile(pixels, r, "antialias"))


def test_static_split_and_no_overview():
  pixels = random_image(40, 40)
  split = images.split_image(pixels, SplitConfig(mode="static", static_grid=2), tile_size=10)
  assert split.grid == (2, 2) and split.tiles.shape == (5, 10, 10, 3)
  split = images.split_image(pixels, SplitConfig(mode="static", static_grid=3, overview=False), tile_size=10)
  assert split.grid == (3, 3) and split.tiles.shape == (9, 10, 10, 3) and not split.overview


@pytest.mark.parametrize("resample", images.RESAMPLE_MODES)
def test_multi_image_rule(resample):
  cfg = SplitConfig(mode="dynamic", n_min=4, n_max=4, max_images_to_split=2, resample=resample)
  pixels = random_image(20, 20)
  two = images.split_images([pixels] * 2, cfg, tile_size=8)
  assert [s.tiles.shape[0] for s in two] == [5, 5]
  three = images.split_images([pixels] * 3, cfg, tile_size=8)
  assert [s.tiles.shape[0] for s in three] == [1, 1, 1] and all(s.grid is None for s in three)
  # Overview only: the image fitted into one tile, the same pixels as a split image's overview.
  np.testing.assert_array_equal(three[0].tiles[0], one_tile(pixels, 8, resample))
  np.testing.assert_array_equal(three[0].tiles[0], two[0].tiles[-1])


def test_bad_split_config():
  with pytest.raises(ValueError, match="mode"):
    images.split_image(random_image(4, 4), SplitConfig(mode="anyres"), tile_size=4)
  with pytest.raises(ValueError, match=r"split.resample .* got 'lanczos'"):
    images.split_image(random_image(4, 4), SplitConfig(mode="none", resample="lanczos"), tile_size=4)
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


def interpolation_weights(n_in: int, n_out: int, kind: str) -> np.ndarray:
  """[n_out, n_in] weights of OpenCV's bilinear / bicubic (a = -0.75) resampling on pixel centres, edges
  replicated, written from its definition."""
  weights = np.zeros((n_out, n_in))
  for i in range(n_out):
    x = (i + 0.5) * n_in / n_out - 0.5
    x0 = int(np.floor(x))
    f = x - x0
    if kind == "linear":  # OpenCV clamps the coordinate itself at the borders
      x0, f = (0, 0.0) if x0 < 0 else (n_in - 1, 0.0) if x0 >= n_in - 1 else (x0, f)
      taps = [(x0, 1 - f), (min(x0 + 1, n_in - 1), f)]
    else:
      a = -0.75
      cubic = lambda t: ((a + 2) * t**3 - (a + 3) * t**2 + 1 if t <= 1 else
                         a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0)
      taps = [(min(max(x0 + k, 0), n_in - 1), cubic(abs(k - f))) for k in range(-1, 3)]
    for j, v in taps:
      weights[i, j] += v
  return weights


def reference_resize(pixels, h_out, w_out, resample):
  """uint8 [h_out, w_out, 3]. "antialias": one PIL bicubic resize. "fast", from its definition: 2 x 2 pixel means
  (an odd last row/column dropped) while the shrink is 2x or more, then bilinear for a shrink, bicubic for an
  enlargement."""
  if resample == "antialias":
    return np.asarray(Image.fromarray(pixels).resize((w_out, h_out), Image.Resampling.BICUBIC))
  (h, w), x = pixels.shape[:2], pixels.astype(np.float64)
  while h >= 2 * h_out and w >= 2 * w_out:
    h, w = h // 2, w // 2
    x = np.floor(x[:h * 2, :w * 2].reshape(h, 2, w, 2, 3).mean(axis=(1, 3)) + 0.5)
  if (h, w) != (h_out, w_out):
    kind = "linear" if h * w > h_out * w_out else "cubic"
    x = (interpolation_weights(h, h_out, kind) @ x.reshape(h, w * 3)).reshape(h_out, w, 3)
    x = np.einsum("pw,owc->opc", interpolation_weights(w, w_out, kind), x)
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def assert_resampled(got, expected, resample):
  """Exact for "antialias" (the same PIL call); "fast" within one level: OpenCV's fixed-point weights."""
  assert got.shape == expected.shape
  if resample == "antialias":
    np.testing.assert_array_equal(got, expected)
  else:
    assert np.abs(got.astype(int) - expected).max() <= 1


def reference_tile(block, side, tile, resample):
  """A block of a side x side square on a tile x tile tile: resized at tile / side, top-left, PAD_RGB around."""
  out = np.empty((tile, tile, 3), np.uint8)
  out[...] = images.PAD_RGB
  if block.size:
    h, w = (min(tile, max(1, round(n * tile / side))) for n in block.shape[:2])
    out[:h, :w] = reference_resize(block, h, w, resample)
  return out


def reference_split(pixels, grid, tile, resample="antialias"):
  """Tiles computed from the definition: the smallest square k whose grid covers the image, the image cut into
  k x k blocks (row-major), each resized onto its tile, then the whole image as the overview."""
  (n_h, n_w), (h, w) = grid, pixels.shape[:2]
  k = max(-(-h // n_h), -(-w // n_w))
  tiles = [reference_tile(pixels[i * k:(i + 1) * k, j * k:(j + 1) * k], k, tile, resample)
           for i in range(n_h) for j in range(n_w)]
  return np.stack(tiles + [reference_tile(pixels, max(h, w), tile, resample)])


@pytest.mark.parametrize("h, w, cfg", [
    (290, 200, SplitConfig(mode="static", static_grid=2)),   # grid tiles shrink 1.45x, the overview 2.9x
    (60, 170, SplitConfig(mode="static", static_grid=3)),    # the bottom tile row is all padding
    (70, 260, SplitConfig(mode="dynamic", n_min=2, n_max=6)),  # wide, upscaled into the grid
    (200, 200, SplitConfig(mode="dynamic", n_min=4, n_max=4)),  # exact fit: the grid tiles are not resized
])
def test_split_equals_direct_reference_below_reducing_shrink(h, w, cfg):
  tile = 100
  pixels = natural_image(h, w, seed=h)
  assert max(h, w) / tile < 2 * images.REDUCING_GAP  # no resize here shrinks enough to be reduced first
  cfg = dataclasses.replace(cfg, resample="antialias")
  split = images.split_image(pixels, cfg, tile_size=tile)
  np.testing.assert_array_equal(split.tiles, reference_split(pixels, split.grid, tile))


@pytest.mark.parametrize("h, w, cfg", [
    (290, 200, SplitConfig(mode="static", static_grid=2)),   # grid tiles shrink 1.45x (bilinear only)
    (550, 425, SplitConfig(mode="static", static_grid=2)),   # overview 5.5x: halved twice, then bilinear
    (60, 170, SplitConfig(mode="static", static_grid=3)),    # enlarged (bicubic); bottom tile row all padding
    (70, 260, SplitConfig(mode="dynamic", n_min=2, n_max=6)),  # wide, enlarged into the grid
    (200, 200, SplitConfig(mode="dynamic", n_min=4, n_max=4)),  # exact fit: the grid tiles are not resized
    (1000, 400, SplitConfig(mode="none")),                   # 10x: halved three times, then bilinear
])
def test_fast_split_equals_its_definition(h, w, cfg):
  tile = 100
  pixels = natural_image(h, w, seed=h)
  split = images.split_image(pixels, cfg, tile_size=tile)
  expected = (reference_split(pixels, split.grid, tile, "fast") if split.grid else
              reference_tile(pixels, max(h, w), tile, "fast")[None])
  assert_resampled(split.tiles, expected, "fast")


@pytest.mark.parametrize("resample", images.RESAMPLE_MODES)
def test_block_tiles_equal_a_whole_image_resize_away_from_tile_edges(resample):
  # 120 x 180 onto a 2 x 3 grid of 100 px tiles: 60 px blocks, the same 5/3 scale as resizing the whole image to
  # 200 x 300. Each block's edges replicate where the whole-image resize looks across; the bicubic kernel reaches
  # 2 source pixels, i.e. 3 tile pixels here, so only those rows and columns may differ.
  pixels, tile = natural_image(120, 180, seed=5), 100
  cfg = SplitConfig(mode="dynamic", n_min=6, n_max=6, overview=False, resample=resample)
  split = images.split_image(pixels, cfg, tile_size=tile)
  assert split.grid == (2, 3) and split.block == 60
  whole = reference_resize(pixels, 200, 300, resample)
  edge_diffs = []
  for i in range(2):
    for j in range(3):
      got, expected = split.tiles[i * 3 + j].astype(int), whole[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile]
      inner = (slice(3 if i else 0, tile - 3 if i < 1 else tile), slice(3 if j else 0, tile - 3 if j < 2 else tile))
      assert np.abs(got[inner] - expected[inner]).max() <= 1
      edge_diffs.append(np.abs(got - expected).max())
  assert max(edge_diffs) > 4  # the edges do differ


def test_write_sources_keeps_enlarged_blocks_and_resizes_shrunk_ones():
  tile = 100
  # A 2 x 2 grid of 45 px blocks and the 90 px overview, all enlarged onto 100 px tiles: copied, not resized.
  pixels = natural_image(90, 90, seed=7)
  split = images.split_image(pixels, SplitConfig(mode="static", static_grid=2), tile_size=tile)
  out, extent = np.zeros((5, tile, tile, 3), np.uint8), np.zeros((5, 4), np.int32)
  split.write_sources(out, extent)
  assert split.block == 45
  np.testing.assert_array_equal(extent, [[45, 45, 100, 100]] * 4 + [[90, 90, 100, 100]])
  np.testing.assert_array_equal(out[3, :45, :45], pixels[45:, 45:])
  assert not out[3, 45:].any() and not out[3, :, 45:].any()  # the rest left for the model to pad
  np.testing.assert_array_equal(out[4, :90, :90], pixels)
  # A shrink stays on the host: the overview of a 150 x 90 image (onto 100 x 60) arrives resized.
  wide = natural_image(90, 150, seed=8)
  split = images.split_image(wide, SplitConfig(mode="static", static_grid=2), tile_size=tile)
  out, extent = np.zeros((5, tile, tile, 3), np.uint8), np.zeros((5, 4), np.int32)
  split.write_sources(out, extent)
  np.testing.assert_array_equal(extent[4], [60, 100, 60, 100])
  np.testing.assert_array_equal(out[4, :60], split.tiles[4, :60])
  np.testing.assert_array_equal(extent[:2], [[75, 75, 100, 100], [75, 75, 100, 100]])
  np.testing.assert_array_equal(extent[2:4], [[15, 75, 20, 100], [15, 75, 20, 100]])
  # Shrunk blocks and empty ones (a 3 x 3 grid over a wide image: its lower two rows of blocks hold no pixels).
  split = images.split_image(natural_image(30, 100, seed=9), SplitConfig(mode="static", static_grid=3), tile_size=10)
  small, small_extent = np.zeros((10, 10, 10, 3), np.uint8), np.zeros((10, 4), np.int32)
  split.write_sources(small, small_extent)
  rows = [[10, 10], [10, 10], [9, 9]]  # 34 px blocks; the last column holds 32 px (9 on the tile)
  expected = [[9, c, 9, t] for c, t in rows] + [[0, c, 0, t] for c, t in rows] * 2 + [[3, 10, 3, 10]]
  np.testing.assert_array_equal(small_extent, expected)
  np.testing.assert_array_equal(small[0, :9], split.tiles[0, :9])
  assert not small[3:9].any()
  # "antialias": every tile resized here.
  split = images.split_image(pixels, SplitConfig(mode="static", static_grid=2, resample="antialias"), tile_size=tile)
  split.write_sources(out, extent)
  np.testing.assert_array_equal(extent[:, :2], extent[:, 2:])
  np.testing.assert_array_equal(out[0], split.tiles[0])


def test_antialias_large_shrinks_are_close_to_exact_bicubic():
  # A 200 dpi page and the paper's 672 px tiles, both scaled by 1/4: grid tiles shrink 1.64 (exact),
  # overview shrink 3.3 (2x2 blocks averaged first, then bicubic).
  pixels, tile = natural_image(550, 425, seed=3), 168
  split = images.split_image(pixels, SplitConfig(mode="static", static_grid=2, resample="antialias"),
                             tile_size=tile)
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
  unsplit = images.split_image(pixels, SplitConfig(mode="none", resample="antialias"), tile_size=tile)
  np.testing.assert_array_equal(unsplit.tiles[0], split.tiles[4])


def test_decode_jpeg_matches_pil():
  raw = encode(natural_image(40, 60), "JPEG")
  expected = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
  np.testing.assert_array_equal(images.decode_image(raw, max_pixels=10**4), expected)


def test_fast_shrinks_average_blocks_before_resampling():
  # A 1-pixel checkerboard has all its energy at the input's Nyquist frequency: plain interpolation shrinking it 2.5x
  # aliases it into a pattern; 2x2 block means first make it flat grey, as the antialiased filter does.
  board = (np.indices((500, 400)).sum(axis=0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, axis=-1)
  fast = images.resize(board, 200, 160, "fast").astype(float)
  antialias = images.resize(board, 200, 160, "antialias").astype(float)
  aliased = cv2.resize(board, (160, 200), interpolation=cv2.INTER_LINEAR).astype(float)
  assert fast.std() < 1 and antialias.std() < 1 < 20 < aliased.std()
  assert abs(fast.mean() - 127.5) < 1


@pytest.mark.parametrize("shrink, max_mean_diff", [(1.64, 2.5), (3.3, 4.0)])
def test_fast_is_close_to_antialias_on_a_page(shrink, max_mean_diff):
  # The shrinks of a 200 dpi page onto stage 2's grid tiles (1.64x) and overview (3.3x), at 1/4 scale. Measured
  # mean differences 2.1 and 3.4 levels (of 255), mostly on text edges; plain bicubic interpolation: 3.2 and 5.9.
  pixels = natural_image(550, 425, seed=3)
  h, w = round(550 / shrink), round(425 / shrink)
  fast = images.resize(pixels, h, w, "fast").astype(int)
  diff = np.abs(fast - images.resize(pixels, h, w, "antialias"))
  assert fast.shape == (h, w, 3) and diff.mean() < max_mean_diff


@pytest.mark.parametrize("fmt, mode", [("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L")])
def test_opencv_decodes_the_same_pixels_as_pil(fmt, mode, monkeypatch):
  pixels = natural_image(37, 53)
  buf = io.BytesIO()
  Image.fromarray(pixels).convert(mode).save(buf, fmt)
  raw = buf.getvalue()
  expected = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
  calls, imdecode = [], cv2.imdecode
  monkeypatch.setattr(images.cv2, "imdecode", lambda *a: calls.append(1) or imdecode(*a))
  np.testing.assert_array_equal(images.decode_image(raw, max_pixels=10**4), expected)
  assert calls == [1]  # decoded by OpenCV, not PIL


def test_truncated_jpeg_and_exif_orientation():
  buf = io.BytesIO()
  Image.fromarray(natural_image(64, 96)).save(buf, "JPEG")
  # libjpeg fills a truncated JPEG with grey and only warns; the file's missing end marker sends it to PIL, which
  # names the error.
  with pytest.raises(ValueError, match=r"rec\[7\].*cannot decode"):
    images.decode_image(buf.getvalue()[:-300], max_pixels=10**5, where="rec[7]")
  # EXIF orientation 6 (rotate 90 degrees) is not applied, by either decoder: pixels as stored, as PIL reads them.
  exif = Image.Exif()
  exif[0x0112] = 6
  buf = io.BytesIO()
  Image.fromarray(natural_image(64, 96)).save(buf, "JPEG", exif=exif.tobytes())
  decoded = images.decode_image(buf.getvalue(), max_pixels=10**5)
  assert decoded.shape == (64, 96, 3)
  np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(buf.getvalue()))))


_FAULTS_SCRIPT = """
import resource, sys
import numpy as np
from mm15_jax.data import images
if sys.argv[1] == "heap":
  assert images.keep_buffers_in_heap() and images.keep_buffers_in_heap()  # once per process; stays in effect
rng, window = np.random.default_rng(0), []
def step():  # a pipeline's pattern: image-sized buffers (1-15 MB), each written whole, 16 alive at a time
  window.append(np.ones(int(rng.integers(1 << 20, 15 << 20)), np.uint8))
  del window[:-16]
for _ in range(400):
  step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
  step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_buffers_in_heap_reuse_their_pages():
  """Freed image buffers are reused from the heap instead of being mapped, faulted in and zeroed afresh."""
  def page_faults(mode):
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)
  fresh, heap = page_faults("default"), page_faults("heap")
  assert fresh > 200 and heap * 10 < fresh, (fresh, heap)
