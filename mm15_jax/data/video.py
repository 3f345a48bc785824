"""Videos as frames (MM1.5-Video): decoding with OpenCV, uniform sampling to N frames, timestamps.

A video record is an sft record with a `video` field and one "<video>" mark in its messages (records.py):
  {"form": "file"}                         `images` holds one element: the video file's bytes (any container and
                                           codec OpenCV's FFmpeg backend reads: mp4/H.264, webm, avi/MJPG, ...);
  {"form": "frames", "timestamps": [...]}  `images` are the frames, encoded images in temporal order, frame k shown
                                           at timestamps[k] seconds.
Sampling keeps at most N frames (data.video.frames), spread uniformly over the video: the middle frame of each of N
equal segments; a video with N frames or fewer keeps all of them. A frame's timestamp is its index / the container's
frame rate (or the decoder's position where the container gives no rate).

OpenCV reads videos from files only, so file bytes are written to a temporary file for decoding. Frames are decoded
in order (grab, and retrieve only the sampled ones); gaps of more than SEEK_GAP frames between sampled frames are
skipped by seeking, and a seek that does not land on its frame (some containers seek to key frames only) makes the
decoder read every frame instead. Videos of several minutes are better stored as frames at conversion
(`--video-frames N`): decoding then costs nothing in training. Corrupt, empty or unreadable videos raise ValueError
naming the record (a bad record).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import NamedTuple, Sequence

import cv2
import numpy as np

from mm15_jax.data import images as images_lib
from mm15_jax.data.records import VIDEO_FORMS as FORMS

# Frames between two sampled ones above which the decoder seeks instead of decoding them all: a seek decodes from
# the key frame before its target, so shorter gaps are cheaper decoded in order (key frames every 10 s or less).
SEEK_GAP = 300


class Frames(NamedTuple):
  pixels: list[np.ndarray]   # uint8 [h, w, 3] RGB per frame, in temporal order
  timestamps: list[float]    # seconds, non-decreasing


def sample_indices(n_total: int, n: int) -> list[int]:
  """Indices of at most n of n_total frames, uniformly spread: the middle frame of each of n equal segments."""
  if n < 1:
    raise ValueError(f"data.video.frames must be at least 1, got {n}")
  if n_total <= n:
    return list(range(n_total))
  return [(2 * k + 1) * n_total // (2 * n) for k in range(n)]


def _open(path: str, where: str) -> cv2.VideoCapture:
  capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
  if not capture.isOpened():
    capture.release()
    raise ValueError(f"{where}: cannot decode video (no container or codec OpenCV can read)")
  return capture


def _read(path: str, wanted: Sequence[int], where: str, max_pixels: int,
          seek_gap: int | None = None) -> tuple[dict[int, tuple], int] | None:
  """Decodes frames in order: {index: (RGB pixels, seconds)} for the wanted indices, and how many frames were
  read (stops after the last wanted one, or at the end of the stream). With `seek_gap`, gaps of more than that many
  frames before a wanted one are skipped by seeking; None when a seek does not land on its frame."""
  capture = _open(path, where)
  try:
    fps = capture.get(cv2.CAP_PROP_FPS)
    ahead, last = sorted(set(wanted)), max(wanted, default=-1)
    out, index = {}, 0
    while last < 0 or index <= last:
      if seek_gap is not None and ahead and ahead[0] - index > seek_gap:
        capture.set(cv2.CAP_PROP_POS_FRAMES, ahead[0])
        if int(capture.get(cv2.CAP_PROP_POS_FRAMES)) != ahead[0]:
          return None
        index = ahead[0]
      if not capture.grab():
        if seek_gap is not None and index in ahead:
          return None  # a seek past the real end: the container's frame count was wrong
        break
      if ahead and index == ahead[0]:
        ahead.pop(0)
        ok, bgr = capture.retrieve()
        if not ok or bgr is None or bgr.ndim != 3:
          raise ValueError(f"{where}: cannot decode video frame {index}")
        h, w = bgr.shape[:2]
        if h * w > max_pixels:
          raise ValueError(f"{where}: video frames of {w}x{h} = {w * h} pixels exceed the decompression-bomb guard "
                           f"data.max_image_pixels={max_pixels}")
        seconds = index / fps if fps > 0 else capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
        out[index] = (cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), float(seconds))
      index += 1
    return out, index
  finally:
    capture.release()


@contextlib.contextmanager
def _as_file(raw: bytes):
  """The path of a temporary file holding `raw` (OpenCV opens videos by name only)."""
  fd, path = tempfile.mkstemp(prefix="mm15_video_")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(raw)
    yield path
  finally:
    os.unlink(path)


def decode_video(raw: bytes, n: int, *, max_pixels: int, where: str = "video") -> Frames:
  """Video file bytes -> at most n uniformly sampled RGB frames with their timestamps."""
  if not raw:
    raise ValueError(f"{where}: empty video bytes")
  with _as_file(raw) as path:
    capture = _open(path, where)
    reported = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    capture.release()
    if reported > 0:
      wanted = sample_indices(reported, n)
      # Seeking skips long stretches between sampled frames; when a seek misses, decode every frame instead.
      read = _read(path, wanted, where, max_pixels, seek_gap=SEEK_GAP) or _read(path, wanted, where, max_pixels)
      frames, n_read = read
      n_total = reported if n_read > wanted[-1] else n_read  # fewer: the container's frame count was wrong
    else:
      wanted, frames, n_total = [], {}, _read(path, [], where, max_pixels)[1]  # no count given: count them
    if n_total == 0:
      raise ValueError(f"{where}: video has no decodable frames")
    if n_total != reported:
      wanted = sample_indices(n_total, n)
      frames, _ = _read(path, wanted, where, max_pixels)
  missing = [i for i in wanted if i not in frames]
  if missing:
    raise ValueError(f"{where}: video frames {missing[:3]} could not be decoded")
  return Frames([frames[i][0] for i in wanted], [frames[i][1] for i in wanted])


def check_video_file(raw: bytes, *, max_pixels: int, where: str = "video") -> None:
  """Raises ValueError unless `raw` is a video whose first frame decodes (a cheap check at conversion time)."""
  if not raw:
    raise ValueError(f"{where}: empty video bytes")
  with _as_file(raw) as path:
    if not _read(path, [0], where, max_pixels)[0]:
      raise ValueError(f"{where}: video has no decodable frames")


def store_video(raw: bytes, frames: int, *, max_pixels: int, where: str = "video",
                jpeg_quality: int = 90) -> tuple[list[bytes], dict]:
  """Video file bytes -> (images, video field) of a record: with frames == 0 the file itself (its first frame
  checked to decode), else `frames` uniformly sampled frames as JPEG with their timestamps (smaller records, no
  decoding when training; the sampling is then fixed at conversion time)."""
  if frames == 0:
    check_video_file(raw, max_pixels=max_pixels, where=where)
    return [bytes(raw)], {"form": "file"}
  sampled = decode_video(raw, frames, max_pixels=max_pixels, where=where)
  images = []
  for pixels in sampled.pixels:
    bgr = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    if not ok:
      raise ValueError(f"{where}: a frame could not be encoded as JPEG")
    images.append(encoded.tobytes())
  return images, {"form": "frames", "timestamps": [round(t, 3) for t in sampled.timestamps]}


def stored_frames(images: Sequence[bytes], timestamps: Sequence[float], n: int, *, max_pixels: int,
                  where: str = "video") -> Frames:
  """A video stored as encoded frames -> at most n of them, uniformly sampled, decoded, with their timestamps."""
  if not images:
    raise ValueError(f"{where}: video has no frames")
  wanted = sample_indices(len(images), n)
  pixels = [images_lib.decode_image(bytes(images[i]), max_pixels=max_pixels, where=f"{where} frame {i}")
            for i in wanted]
  return Frames(pixels, [float(timestamps[i]) for i in wanted])


def record_frames(record: dict, n: int, *, max_pixels: int, where: str = "record") -> Frames:
  """The sampled frames of a video record (see the module docstring)."""
  video = record.get("video")
  if not isinstance(video, dict) or video.get("form") not in FORMS:
    raise ValueError(f"{where}: field 'video' must be an object with form one of {FORMS}, got {video!r:.80}")
  images = record.get("images", [])
  if video["form"] == "file":
    if len(images) != 1:
      raise ValueError(f"{where}: a video of form 'file' stores one file in images, got {len(images)} elements")
    return decode_video(bytes(images[0]), n, max_pixels=max_pixels, where=f"{where} video")
  timestamps = video.get("timestamps")
  if not isinstance(timestamps, list) or len(timestamps) != len(images):
    raise ValueError(f"{where}: a video of form 'frames' needs one timestamp per frame ({len(images)} frames)")
  return stored_frames(images, timestamps, n, max_pixels=max_pixels, where=f"{where} video")


def encode_frames(frames: Sequence[np.ndarray], *, fps: float, suffix: str = ".avi", fourcc: str = "MJPG") -> bytes:
  """RGB frames (uint8 [h, w, 3], one size) -> the bytes of a video file written by OpenCV (default Motion-JPEG in
  AVI, which every OpenCV build can write)."""
  if not frames:
    raise ValueError("encode_frames: no frames")
  h, w = frames[0].shape[:2]
  fd, path = tempfile.mkstemp(prefix="mm15_video_", suffix=suffix)
  os.close(fd)
  try:
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    if not writer.isOpened():
      raise ValueError(f"encode_frames: OpenCV cannot write {fourcc} into {suffix} files")
    for frame in frames:
      writer.write(cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR))
    writer.release()
    with open(path, "rb") as f:
      return f.read()
  finally:
    os.unlink(path)

