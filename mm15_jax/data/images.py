"""Image decoding and AnyRes splitting into tiles (pure numpy / PIL).

Splitting never stretches: an image is resized keeping its aspect ratio to fit a canvas, placed at the top-left
corner and padded at the bottom/right with the CLIP mean colour (which normalises to ~0 inside the model). Boxes in
text are on a 0..1000 grid of the WHOLE image, so splitting never touches text.

Modes (SplitConfig.mode):
  "none":    one tile, the whole image fitted into a tile x tile square (padded, not stretched).
  "static":  the image fitted into a (grid*tile) square, grid x grid tiles, + overview.
  "dynamic": grid (n_h, n_w) chosen by `choose_grid` among n_min <= n_h*n_w <= n_max, + overview.
The overview (the whole image fitted into one tile) comes AFTER the tiles: under the causal mask it then attends to
every tile. A sample with more than `max_images_to_split` images is not split: each image is one overview-like tile.
"""
from __future__ import annotations

import io
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

from mm15_jax.config import SplitConfig

# CLIP mean in 0..255: padded pixels normalise to ~0.
PAD_RGB = (123, 117, 104)
# A resize that shrinks by >= 2 * REDUCING_GAP first averages whole k x k pixel blocks (Image.reduce, k =
# int(shrink / REDUCING_GAP)), then resamples bicubically by the remaining factor (>= REDUCING_GAP): ~2x less work
# than one bicubic pass over the full image, e.g. the overview of a page scan. Smaller shrinks are exact bicubic.
REDUCING_GAP = 1.5


class SplitImage(NamedTuple):
  """Tiles of one image, in the order their placeholders appear in the text."""
  tiles: np.ndarray                # uint8 [n, S, S, 3]; row-major grid tiles, then the overview if any
  grid: tuple[int, int] | None     # (n_h, n_w); None: not split (one tile = the whole image)
  overview: bool                   # whether the last tile is the overview


def decode_image(raw: bytes, *, max_pixels: int, where: str = "image") -> np.ndarray:
  """Encoded PNG/JPEG/... bytes -> uint8 [H, W, 3] RGB. Any failure is a ValueError naming `where`."""
  if not raw:
    raise ValueError(f"{where}: empty image bytes")
  errors = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
  try:
    im = Image.open(io.BytesIO(raw))
    w, h = im.size  # read from the header, before any pixel is decoded
  except errors as e:
    raise ValueError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e
  with im:
    if w * h > max_pixels:
      raise ValueError(f"{where}: image of {w}x{h} = {w * h} pixels exceeds the decompression-bomb guard "
                       f"data.max_image_pixels={max_pixels}")
    if w < 1 or h < 1:
      raise ValueError(f"{where}: image has an empty size {w}x{h}")
    try:
      im.load()  # raises on truncated data
      if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        # Composite over white, as a viewer shows it (a plain convert would turn transparent areas black).
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
      rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # convert("RGB") of RGB would copy
    except errors as e:
      raise ValueError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e
  return rgb


def fit_size(h: int, w: int, canvas_h: int, canvas_w: int) -> tuple[int, int]:
  """Size of an (h, w) image resized keeping its aspect ratio to fit inside the canvas (up or down)."""
  scale = min(canvas_h / h, canvas_w / w)
  h_g = min(canvas_h, max(1, int(round(h * scale))))
  w_g = min(canvas_w, max(1, int(round(w * scale))))
  return h_g, w_g


def candidate_grids(n_min: int, n_max: int) -> list[tuple[int, int]]:
  if not 1 <= n_min <= n_max:
    raise ValueError(f"split: need 1 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
  return [(n_h, n_w) for n_h in range(1, n_max + 1) for n_w in range(1, n_max + 1)
          if n_min <= n_h * n_w <= n_max]


def choose_grid(h: int, w: int, tile: int, n_min: int, n_max: int) -> tuple[int, int]:
  """The MM1.5 dynamic-split grid for an (h, w) image.

  For each candidate the image is fitted (aspect kept) into the (n_h*tile, n_w*tile) canvas. If some grids need no
  downscaling, pick the least padding among them; otherwise the least resolution lost (h*w - fitted area).
  Ties: least padding, then fewest tiles, then fewest rows (deterministic).
  """
  no_downscale, downscale = [], []
  for n_h, n_w in candidate_grids(n_min, n_max):
    canvas_h, canvas_w = n_h * tile, n_w * tile
    h_g, w_g = fit_size(h, w, canvas_h, canvas_w)
    padding = canvas_h * canvas_w - h_g * w_g
    if h <= canvas_h and w <= canvas_w:
      no_downscale.append(((padding, n_h * n_w, n_h), (n_h, n_w)))
    else:
      lost = h * w - h_g * w_g
      downscale.append(((lost, padding, n_h * n_w, n_h), (n_h, n_w)))
  return min(no_downscale or downscale)[1]


def _fitted(image: np.ndarray, canvas_h: int, canvas_w: int, pil: Image.Image | None = None) -> np.ndarray:
  """uint8 [h_g, w_g, 3]: `image` resized keeping its aspect ratio to fit the canvas (see REDUCING_GAP). `pil`:
  the same pixels as a PIL image, when the caller already has them."""
  h, w = image.shape[:2]
  h_g, w_g = fit_size(h, w, canvas_h, canvas_w)
  if (h_g, w_g) == (h, w):
    return image
  pil = Image.fromarray(image) if pil is None else pil
  return np.asarray(pil.resize((w_g, h_g), Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP))


def _pad_into(out: np.ndarray, part: np.ndarray) -> None:
  """out uint8 [H, W, 3] (C-contiguous) = `part` [h, w, 3] at the top-left, PAD_RGB elsewhere.

  Rows of packed RGB: padding is written as whole row slices (broadcasting a 3-vector is ~3x slower).
  """
  (canvas_h, canvas_w, _), (h, w, _) = out.shape, part.shape
  rows = out.reshape(canvas_h, canvas_w * 3)  # a view: out is contiguous
  pad_row = np.tile(np.asarray(PAD_RGB, np.uint8), canvas_w)
  rows[:h, :w * 3] = part.reshape(h, w * 3)
  rows[:h, w * 3:] = pad_row[w * 3:]
  rows[h:] = pad_row


def fit_and_pad(image: np.ndarray, canvas_h: int, canvas_w: int) -> np.ndarray:
  """uint8 [h, w, 3] -> [canvas_h, canvas_w, 3]: aspect-preserving resize, top-left, padded with PAD_RGB."""
  canvas = np.empty((canvas_h, canvas_w, 3), np.uint8)
  _pad_into(canvas, _fitted(image, canvas_h, canvas_w))
  return canvas


def _cut_into(tiles: np.ndarray, fitted: np.ndarray, grid: tuple[int, int]) -> None:
  """tiles uint8 [n_h*n_w, S, S, 3] = the row-major tiles of `fitted` padded to the (n_h*S, n_w*S) canvas, each
  written once (no intermediate canvas)."""
  (n_h, n_w), tile = grid, tiles.shape[1]
  for i in range(n_h):
    for j in range(n_w):
      _pad_into(tiles[i * n_w + j], fitted[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile])


def split_image(image: np.ndarray, cfg: SplitConfig, *, tile_size: int | None = None,
                n_max: int | None = None, allow_split: bool = True) -> SplitImage:
  """One decoded image -> its tiles. `n_max` overrides cfg.n_max (inference may use more tiles)."""
  tile = tile_size or cfg.tile_size
  if cfg.mode not in ("none", "static", "dynamic"):
    raise ValueError(f"split.mode must be 'none', 'static' or 'dynamic', got {cfg.mode!r}")
  if cfg.mode == "none" or not allow_split:
    return SplitImage(fit_and_pad(image, tile, tile)[None], None, False)
  if cfg.mode == "static":
    grid = (cfg.static_grid, cfg.static_grid)
  else:
    h, w = image.shape[:2]
    grid = choose_grid(h, w, tile, cfg.n_min, cfg.n_max if n_max is None else n_max)
  n = grid[0] * grid[1]
  pil = Image.fromarray(image)  # converted once for both resizes
  # Grid tiles and the overview written straight into the returned array.
  tiles = np.empty((n + int(cfg.overview), tile, tile, 3), np.uint8)
  _cut_into(tiles[:n], _fitted(image, grid[0] * tile, grid[1] * tile, pil), grid)
  if cfg.overview:
    _pad_into(tiles[n], _fitted(image, tile, tile, pil))
  return SplitImage(tiles, grid, cfg.overview)


def split_images(images: Sequence[np.ndarray], cfg: SplitConfig, *, tile_size: int | None = None,
                 n_max: int | None = None) -> list[SplitImage]:
  """All images of one sample: split only when the sample has at most cfg.max_images_to_split images."""
  allow_split = len(images) <= cfg.max_images_to_split
  return [split_image(im, cfg, tile_size=tile_size, n_max=n_max, allow_split=allow_split) for im in images]
