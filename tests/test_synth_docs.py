"""synth_docs: line wrapping, and rendered words whose ink is the word drawn (its transcription is right)."""
import io

import numpy as np
from PIL import Image, ImageDraw

from mm15_jax.data import synth_docs


def test_wrap_fits_the_width_and_keeps_every_word_in_order():
  rng = np.random.default_rng(0)
  fnt = synth_docs.font(11)
  for width in (40.0, 120.0, 300.0):
    text = " ".join(synth_docs.sentence(rng) for _ in range(5))
    lines = synth_docs.wrap(text, fnt, width)
    assert " ".join(lines).split() == text.split()
    assert all(fnt.getlength(line) <= width or " " not in line for line in lines), (width, lines)
    # Greedy: the next line's first word would not have fitted on the line before it.
    for line, following in zip(lines, lines[1:]):
      assert fnt.getlength(f"{line} {following.split()[0]}") > width


def test_rendered_word_is_ink_of_that_word_on_a_light_background():
  for seed in range(5):
    word = synth_docs.SIGN_WORDS[seed]
    pixels = np.asarray(Image.open(io.BytesIO(synth_docs.render_word(np.random.default_rng(seed), word))))
    background = np.median(pixels.reshape(-1, 3), axis=0)
    assert (background >= 200).all()
    ink = np.any(np.abs(pixels.astype(int) - background) > 60, axis=-1)
    ys, xs = np.nonzero(ink)
    # Drawing the same word in the same font at the origin gives ink of the same extent (placement varies).
    fnt = synth_docs.font(_glyph_size(ink, word))
    ref = Image.new("L", (pixels.shape[1] * 2, pixels.shape[0] * 2), 0)
    ImageDraw.Draw(ref).text((0, 0), word, fill=255, font=fnt)
    ry, rx = np.nonzero(np.asarray(ref) > 128)
    assert abs((xs.max() - xs.min()) - (rx.max() - rx.min())) <= 3, word
    assert abs((ys.max() - ys.min()) - (ry.max() - ry.min())) <= 3, word


def _glyph_size(ink: np.ndarray, word: str) -> int:
  """The font size whose rendering of `word` is as wide as the ink (sizes searched 10..120); the test then checks
  the height, which a different word or no word would not match."""
  xs = np.nonzero(ink.any(axis=0))[0]
  return min(range(10, 121), key=lambda s: abs(_ink_width(word, s) - (xs.max() - xs.min())))


def _ink_width(word: str, size: int) -> int:
  fnt = synth_docs.font(size)
  image = Image.new("L", (size * len(word) * 2, size * 2), 0)
  ImageDraw.Draw(image).text((0, 0), word, fill=255, font=fnt)
  xs = np.nonzero((np.asarray(image) > 128).any(axis=0))[0]
  return int(xs.max() - xs.min())
