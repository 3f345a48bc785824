"""Image decoding and AnyRes splitting into tiles (numpy, OpenCV, PIL).

Splitting never stretches: the image is cut into the square blocks that its grid of tiles covers (the smallest such
square: the image fills the grid's width or height to within one source pixel per tile), each block is resized
onto its tile at one scale for both axes, placed at the top-left and padded at the bottom/right with the CLIP mean
colour (which normalises to ~0 inside the model). Resizing each block rather than the whole image differs from a
resize of the whole image only within two source pixels of a tile edge (the edges replicate instead of looking
across); in exchange each tile is resized straight into its batch slot, or, with SplitConfig.enlarge_on_device,
its source pixels (at most a tile's worth when it is enlarged) are copied there and the model enlarges them
(`multimodal.enlarge_tiles`): the host then decodes and copies, and never writes the 3-6x larger tiles of a photo.
Boxes in text are on a 0..1000 grid of the WHOLE image, so splitting never touches text.

Modes (SplitConfig.mode):
  "none":    one tile, the whole image fitted into a tile x tile square (padded, not stretched).
  "static":  the image fitted into a (grid*tile) square, grid x grid tiles, + overview.
  "dynamic": grid (n_h, n_w) chosen by `choose_grid` among n_min <= n_h*n_w <= n_max, + overview.
The overview (the whole image fitted into one tile) comes AFTER the tiles: under the causal mask it then attends to
every tile. A sample with more than `max_images_to_split` images is not split: each image is one overview-like tile.

Resampling (SplitConfig.resample), measured in BENCHMARKS.md section 2:
  "fast":      enlargements bicubic (OpenCV, a = -0.75); a shrink by s >= 2 first halves the image (2 x 2 pixel
               means) until less than 2x is left, then resamples bilinearly by the rest. 5-10x less CPU per resize;
               fine detail shrunk by less than 2x can alias (a 1-pixel checkerboard does), which "antialias" blurs.
  "antialias": PIL's bicubic, antialiased for shrinks (the filter widens with the shrink): the reference.
"""
from __future__ import annotations

import ctypes
import io
import platform
from typing import NamedTuple, Sequence

import cv2
import numpy as np
from PIL import Image

from mm15_jax.config import SplitConfig

# Input workers are the parallelism; OpenCV's own thread pool inside each would oversubscribe their cores.
cv2.setNumThreads(1)

RESAMPLE_MODES = ("fast", "antialias")
# CLIP mean in 0..255: padded pixels normalise to ~0.
PAD_RGB = (123, 117, 104)
# "antialias": a resize that shrinks by >= 2 * REDUCING_GAP first averages whole k x k pixel blocks (Image.reduce,
# k = int(shrink / REDUCING_GAP)), then resamples bicubically by the remaining factor (>= REDUCING_GAP): ~2x less
# work than one bicubic pass over the full image, e.g. the overview of a page scan. Smaller shrinks are exact bicubic.
REDUCING_GAP = 1.5
# Decoded by OpenCV straight into numpy (the same libjpeg-turbo / libpng pixels as PIL, tested; faster than PIL's
# decode, and no copy into numpy after it): 8-bit RGB or grey JPEG and PNG whose last bytes are the format's end
# marker. Everything else (alpha, palettes, CMYK, a truncated file) goes through PIL, which also names the error.
_CV2_MODES = ("RGB", "L")
_CV2_END = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xae\x42\x60\x82"}
_CV2_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION  # PIL does not apply EXIF orientation either


# glibc mallopt parameters (malloc.h) and the values `keep_buffers_in_heap` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20    # glibc's largest: a decoded photo, a grid canvas and a sample's tiles are all below it
_TRIM_THRESHOLD = 1 << 30     # freed heap memory kept for the next samples before any is returned to the system
_buffers_in_heap = False


def keep_buffers_in_heap() -> bool:
  """Serve this process's image-sized allocations from a heap that keeps freed memory (glibc; once per process).

  By default glibc maps every allocation above 128 KiB-32 MiB afresh and unmaps it when freed, so each decoded image,
  canvas and tile array (1-15 MB) costs page faults and kernel zeroing on first touch: about a fifth of the
  pipeline's CPU time on 672 px tiles (BENCHMARKS.md section 2). With a fixed mmap threshold of 32 MiB and a trim
  threshold of 1 GiB the same heap pages are reused sample after sample. Returns whether the setting is in effect
  (False on other C libraries, where nothing is changed).
  """
  global _buffers_in_heap
  if not _buffers_in_heap and platform.libc_ver()[0] == "glibc":
    libc = ctypes.CDLL(None)
    _buffers_in_heap = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                            and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
  return _buffers_in_heap


class SplitImage(NamedTuple):
  """One image's tiles, in the order their placeholders appear in the text, kept as the decoded picture and the square
  block of it that each tile shows.

  The grid's tiles cut the picture into `block` x `block` pixel squares, row-major (the last row and column of blocks
  may be cut short by the picture's edge, or be empty); the overview, or the one tile of an unsplit image, shows the
  whole picture as a max(h, w) square. A block of b_h x b_w pixels in a square of `side` pixels becomes the tile's
  top-left round(b_h * S / side) x round(b_w * S / side) pixels (the same scale on both axes: never stretched), the
  rest PAD_RGB. Blocks, not the whole picture, are resized, so that each tile is resized straight into its batch slot
  (`write_tiles`), or its source pixels are copied there for the model to enlarge (`write_sources`)."""
  grid: tuple[int, int] | None       # (n_h, n_w); None: not split (one tile = the whole image)
  overview: bool                     # whether the last (overview_first: the first) tile is the overview
  tile_size: int                     # S
  pixels: np.ndarray                 # uint8 [h, w, 3]: the decoded image
  block: int                         # source pixels per side of a grid tile (the longer side when not split)
  resample: str                      # SplitConfig.resample
  overview_first: bool = False       # the overview is the first tile instead of the last

  @property
  def n_tiles(self) -> int:
    return (1 if self.grid is None else self.grid[0] * self.grid[1]) + int(self.overview)

  def blocks(self) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """Per tile: its source block (a view of `pixels`, [b_h, b_w, 3]) and the (rows, cols) it covers on the tile."""
    (n_h, n_w), k = self.grid or (1, 1), self.block
    squares = [(self.pixels[i * k:(i + 1) * k, j * k:(j + 1) * k], k) for i in range(n_h) for j in range(n_w)]
    if self.overview:
      whole = (self.pixels, max(self.pixels.shape[:2]))
      squares = [whole] + squares if self.overview_first else squares + [whole]
    return [(block, placed_size(*block.shape[:2], side, self.tile_size)) for block, side in squares]

  def write_tiles(self, out: np.ndarray) -> None:
    """out uint8 [n_tiles, S, S, 3], each tile C-contiguous = row-major grid tiles, then the overview if any (before
    them with overview_first)."""
    for slot, (block, (h, w)) in zip(out, self.blocks()):
      if (h, w) == slot.shape[:2]:
        resize(block, h, w, self.resample, out=slot)
      else:
        _pad_into(slot, self._resized(block, h, w))

  def write_sources(self, out: np.ndarray, extent: np.ndarray) -> None:
    """For the model to enlarge the tiles (`multimodal.enlarge_tiles`, SplitConfig.enlarge_on_device): out uint8
    [n_tiles, S, S, 3] (zeros) gets each tile's source pixels at its top-left, extent int32 [n_tiles, 4] their
    (rows, cols) and the (rows, cols) they cover on the tile. A block that shrinks, or any block under "antialias",
    is resized here and its extent says so (rows, cols twice). Padding is the model's."""
    for slot, row, (block, (h, w)) in zip(out, extent, self.blocks()):
      b_h, b_w = block.shape[:2]
      if not (self.resample == "fast" and b_h <= h and b_w <= w):
        block, (b_h, b_w) = self._resized(block, h, w), (h, w)
      slot.reshape(slot.shape[0], -1)[:b_h, :b_w * 3] = block.reshape(b_h, b_w * 3)
      row[:] = (b_h, b_w, h, w)

  def _resized(self, block: np.ndarray, h: int, w: int) -> np.ndarray:
    """`block` resized to [h, w, 3] (an empty block when it covers no tile pixel)."""
    return resize(block, h, w, self.resample) if h and w else block[:0, :0]

  @property
  def tiles(self) -> np.ndarray:
    """uint8 [n_tiles, S, S, 3] (a new array)."""
    out = np.empty((self.n_tiles, self.tile_size, self.tile_size, 3), np.uint8)
    self.write_tiles(out)
    return out


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
    end = _CV2_END.get(im.format)
    if end is not None and im.mode in _CV2_MODES and raw.endswith(end):
      rgb = cv2.imdecode(np.frombuffer(raw, np.uint8), _CV2_FLAGS)
      if rgb is not None and rgb.shape == (h, w, 3):
        return rgb
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
    raise ValueError(f"data.split: need 1 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
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


def placed_size(h: int, w: int, side: int, tile: int) -> tuple[int, int]:
  """(rows, cols) that an h x w block of a side x side square covers on a tile x tile tile (at least one of each
  when the block has pixels)."""
  return tuple(min(tile, max(1, round(n * tile / side))) if n else 0 for n in (h, w))


def resize(image: np.ndarray, h_out: int, w_out: int, resample: str = "fast",
           out: np.ndarray | None = None) -> np.ndarray:
  """uint8 [h, w, 3] -> [h_out, w_out, 3] with the SplitConfig.resample filter (see the module docstring), written
  into `out` (uint8 [h_out, w_out, 3], C-contiguous) when given."""
  h, w = image.shape[:2]
  if (h, w) != (h_out, w_out):
    if resample == "antialias":
      image = np.asarray(Image.fromarray(image).resize((w_out, h_out), Image.Resampling.BICUBIC,
                                                       reducing_gap=REDUCING_GAP))
    elif resample != "fast":
      raise ValueError(f"data.split.resample must be one of {RESAMPLE_MODES}, got {resample!r}")
    else:
      while h >= 2 * h_out and w >= 2 * w_out:
        # Halved: exact 2 x 2 pixel means (OpenCV's vectorised INTER_AREA path; 6x faster than its 3 x 3 means
        # for a page). An odd last row/column is dropped: one input pixel, less than half an output pixel.
        h, w = h // 2, w // 2
        image = cv2.resize(image[:h * 2, :w * 2], (w, h), interpolation=cv2.INTER_AREA)
      if (h, w) != (h_out, w_out):
        # Bilinear for the remaining shrink (< 2x: closer to the antialiased filter than bicubic, measured).
        interpolation = cv2.INTER_LINEAR if h * w > h_out * w_out else cv2.INTER_CUBIC
        return cv2.resize(image, (w_out, h_out), dst=out, interpolation=interpolation)  # into `out` if given
  if out is None:
    return image
  out[...] = image
  return out


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


TILE_MARKERS = ("index", "separator")


def check_split_config(cfg: SplitConfig) -> None:
  """A ValueError naming the data.split key that holds a value splitting does not know."""
  if cfg.mode not in ("none", "static", "dynamic"):
    raise ValueError(f"data.split.mode must be 'none', 'static' or 'dynamic', got {cfg.mode!r}")
  if cfg.resample not in RESAMPLE_MODES:
    raise ValueError(f"data.split.resample must be one of {RESAMPLE_MODES}, got {cfg.resample!r}")
  if cfg.tile_markers not in TILE_MARKERS:
    raise ValueError(f"data.split.tile_markers must be one of {TILE_MARKERS}, got {cfg.tile_markers!r}")
  if cfg.mode == "dynamic":
    candidate_grids(cfg.n_min, cfg.n_max)  # raises on an empty range


def split_image(image: np.ndarray, cfg: SplitConfig, *, tile_size: int, n_max: int | None = None,
                allow_split: bool = True) -> SplitImage:
  """One decoded image -> its tiles of `tile_size` pixels. `n_max` overrides cfg.n_max (inference may use more
  tiles)."""
  tile = tile_size
  check_split_config(cfg)
  h, w = image.shape[:2]
  if cfg.mode == "none" or not allow_split:
    return SplitImage(None, False, tile, image, max(h, w), cfg.resample)
  if cfg.mode == "static":
    grid = (cfg.static_grid, cfg.static_grid)
  else:
    grid = choose_grid(h, w, tile, cfg.n_min, cfg.n_max if n_max is None else n_max)
  block = max(-(-h // grid[0]), -(-w // grid[1]))  # the smallest square whose grid covers the image
  return SplitImage(grid, cfg.overview, tile, image, block, cfg.resample, cfg.overview_first)


def split_images(images: Sequence[np.ndarray], cfg: SplitConfig, *, tile_size: int,
                 n_max: int | None = None) -> list[SplitImage]:
  """All images of one sample: split only when the sample has at most cfg.max_images_to_split images."""
  allow_split = len(images) <= cfg.max_images_to_split
  return [split_image(im, cfg, tile_size=tile_size, n_max=n_max, allow_split=allow_split) for im in images]
