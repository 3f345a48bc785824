"""Paths: local folders and object-store URLs (gs://, s3://, ...) through one type, `etils.epath.Path`.

Everything the project reads or writes (tokenizer, datasets, checkpoints, metrics, reports) takes either kind.
Object stores are reached through fsspec (gcsfs for gs://), Orbax's tensorstore and ArrayRecord's own GCS client;
each finds its credentials the standard way (application default credentials, a VM's service account).
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import uuid
from typing import Iterator

import fsspec
from etils import epath

PathLike = epath.PathLike

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def path(p: PathLike) -> epath.Path:
  return epath.Path(p)


def is_local(p: PathLike) -> bool:
  return not _URL.match(os.fspath(p))


def absolute(p: PathLike) -> str:
  """An absolute local path, or the URL unchanged (an object store has no working directory)."""
  return os.path.abspath(p) if is_local(p) else os.fspath(epath.Path(p))


def join(p: PathLike, *parts: str) -> str:
  return os.fspath(epath.Path(p).joinpath(*parts))


class StorageError(OSError):
  """One line: the path, what went wrong, what to do."""


class MissingError(StorageError, FileNotFoundError):
  """A StorageError for a path (or its bucket) that does not exist."""


def storage_error(p: PathLike, e: BaseException, *, what: str = "") -> StorageError:
  """`e` raised while reading or writing `p` (a `what`, e.g. "tokenizer model") -> a StorageError saying what to do."""
  text = f"{type(e).__name__}: {e}"
  bucket = _bucket(p)
  if re.search(r"bucket does not exist|NoSuchBucket", text, re.I) or (
      bucket and isinstance(e, FileNotFoundError) and not _exists(bucket)):
    fix = f"bucket {bucket} does not exist: create it (gcloud storage buckets create {bucket}) or fix the path"
  elif re.search(r"credential|\b401\b|Unauthorized|Anonymous caller|invalid_grant|Reauthentication", text, re.I):
    fix = ("no usable Google Cloud credentials: run `gcloud auth application-default login`, or give the VM a "
           "service account with storage access")
  elif isinstance(e, PermissionError) or re.search(r"\b403\b|Forbidden|Permission|AccessDenied", text, re.I):
    fix = ("permission denied: grant this account Storage Object Admin (roles/storage.objectAdmin) on "
           f"{bucket or 'the folder'}, or choose another path")
  elif isinstance(e, FileNotFoundError):
    fix = "does not exist: check the path"
  else:
    fix = text.splitlines()[0]
  kind = MissingError if isinstance(e, FileNotFoundError) else StorageError
  return kind(f"{what + ' ' if what else ''}{os.fspath(p)}: {fix}")


def _exists(p: PathLike) -> bool:
  try:
    return epath.Path(p).exists()
  except Exception:  # no access to the bucket says nothing about the object
    return True


def _bucket(p: PathLike) -> str:
  m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^/]+)", os.fspath(p))
  return m.group(1) if m else ""


def ensure_writable_dir(p: PathLike) -> epath.Path:
  """Creates folder `p` and proves it takes a write (a probe object of its own, removed again).

  Raises StorageError naming `p` and the fix (missing bucket, credentials, permission) before any real work;
  nothing already there is read or changed.
  """
  d = epath.Path(p)
  probe = d / f".write-probe-{uuid.uuid4().hex}"
  try:
    d.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"")
    probe.unlink()
  except Exception as e:  # every client raises its own types
    raise storage_error(p, e) from e
  return d


class LineLog:
  """Appends lines to a text file, kept across reopenings (a resumed run continues its log).

  Object stores have no append: on GCS each write uploads the new line and composes it onto the object (constant
  cost per line); other stores rewrite the whole object. A failed write raises: the caller stops.
  """

  def __init__(self, p: PathLike):
    self.path = epath.Path(p)
    self._local = is_local(p)
    if self._local:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._f = open(self.path, "a")
      return
    self._fs, self._name = fsspec.core.url_to_fs(os.fspath(self.path))
    self._compose = getattr(self._fs, "merge", None)  # gcsfs: GCS compose
    self._exists = self.path.exists()
    self._text = "" if self._compose or not self._exists else self.path.read_text()

  def write(self, line: str):
    line += "\n"
    if self._local:
      self._f.write(line)
      self._f.flush()
    elif self._compose and self._exists:
      part = f"{self._name}.part-{uuid.uuid4().hex}"
      self._fs.pipe_file(part, line.encode())
      self._compose(self._name, [self._name, part])
      self._fs.rm_file(part)
    else:
      self._text += line
      self.path.write_text(self._text)
      self._exists = True

  def close(self):
    if self._local:
      self._f.close()


def upload_tree(local_dir: str, target: PathLike) -> None:
  """Copies the files under `local_dir` to folder `target` (any epath URL), keeping the layout."""
  for folder, _, files in os.walk(local_dir):
    dest = epath.Path(target) / os.path.relpath(folder, local_dir)
    for f in files:
      epath.Path(folder, f).copy(dest / f, overwrite=True)


@contextlib.contextmanager
def local_copy(p: PathLike) -> Iterator[str]:
  """A local file or folder with the contents of `p`: `p` itself when local, else a temporary download."""
  if is_local(p):
    yield os.fspath(p)
    return
  src = epath.Path(p)
  with tempfile.TemporaryDirectory() as tmp:
    dst = epath.Path(tmp) / src.name
    if src.is_dir():
      dst.mkdir()
      for child in src.iterdir():
        if child.is_file():
          child.copy(dst / child.name)
    else:
      src.copy(dst)
    yield os.fspath(dst)
