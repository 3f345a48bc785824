"""One run per workdir: a lease file `<workdir>/.mm15-lock.json` naming its holder (host, pid, start time).

The holder refreshes the lease every TTL/4 seconds while it lives. A second launch on the same workdir refuses with
one line naming the holder; a lease whose holder is gone (same host, process not running) or that has not been
refreshed for TTL seconds (MM15_LOCK_TTL_S, default 120) is taken over with a warning. Only process 0 of a
multi-host job holds it; the others learn the outcome from it. On gs:// the lease is one object written with
generation preconditions (google-cloud-storage); MM15_NO_WORKDIR_LOCK=1 runs without the lock.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import socket
import sys
import threading
import time
import uuid

import jax
import numpy as np
from etils import epath

from mm15_jax import errors, paths

LEASE = ".mm15-lock.json"


def ttl_s() -> float:
  return float(os.environ.get("MM15_LOCK_TTL_S", "120"))


class _LocalLease:
  """The lease as a file: created with O_EXCL; taken over by renaming the stale one aside (one taker wins)."""

  def __init__(self, path: str):
    self.path = path

  def create(self, lease: dict) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(lease, f)
    return True

  def read(self) -> dict | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except ValueError:  # being written, or damaged: judged by its age alone
      return {"token": "", "refreshed": os.path.getmtime(self.path), "host": "?", "pid": 0, "start": "?"}

  def take_over(self, stale: dict, lease: dict) -> bool:
    aside = f"{self.path}.{uuid.uuid4().hex}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return False
    try:
      with open(aside) as f:
        moved = json.load(f)
    except ValueError:
      moved = {"token": ""}
    if moved.get("token") != stale.get("token"):  # replaced since we read it: put it back, someone else won
      os.rename(aside, self.path)
      return False
    os.remove(aside)
    return self.create(lease)

  def refresh(self, lease: dict) -> bool:
    if (self.read() or {}).get("token") != lease["token"]:
      return False
    tmp = f"{self.path}.{lease['token']}.tmp"
    with open(tmp, "w") as f:
      json.dump(lease, f)
    os.replace(tmp, self.path)
    return True

  def release(self, lease: dict) -> None:
    if (self.read() or {}).get("token") == lease["token"]:
      os.remove(self.path)


class _GcsLease:
  """The lease as a Cloud Storage object; every write is conditional on the generation read before it."""

  def __init__(self, path: str):
    try:
      from google.api_core import exceptions
      from google.cloud import storage
    except ImportError as e:
      raise errors.UserError(f"the workdir lock on {path} needs google-cloud-storage (pip install "
                             "google-cloud-storage), or set MM15_NO_WORKDIR_LOCK=1 to run without it") from e
    bucket, _, name = path[len("gs://"):].partition("/")
    self.blob = storage.Client().bucket(bucket).blob(name)
    self.conflict = (exceptions.PreconditionFailed, exceptions.NotFound)
    self.generation = None

  def _write(self, lease: dict, generation) -> bool:
    try:
      self.blob.upload_from_string(json.dumps(lease), if_generation_match=generation)
    except self.conflict:
      return False
    self.generation = self.blob.generation
    return True

  def create(self, lease: dict) -> bool:
    return self._write(lease, 0)

  def read(self) -> dict | None:
    try:
      self.blob.reload()
      generation = self.blob.generation
      data = self.blob.download_as_bytes(if_generation_match=generation)
    except self.conflict:
      return None
    lease = json.loads(data)
    lease["_generation"] = generation
    return lease

  def take_over(self, stale: dict, lease: dict) -> bool:
    return self._write(lease, stale["_generation"])

  def refresh(self, lease: dict) -> bool:
    return self._write(lease, self.generation)

  def release(self, lease: dict) -> None:
    try:
      self.blob.delete(if_generation_match=self.generation)
    except self.conflict:
      pass


def _holder(lease: dict) -> str:
  return (f"host {lease.get('host')} pid {lease.get('pid')} since {lease.get('start')} "
          f"(refreshed {time.time() - float(lease.get('refreshed', 0)):.0f} s ago)")


def _stale(lease: dict) -> str | None:
  """Why the lease no longer protects a live run, or None."""
  if time.time() - float(lease.get("refreshed", 0)) > ttl_s():
    return f"not refreshed for over {ttl_s():.0f} s"
  if lease.get("host") == socket.gethostname() and lease.get("pid"):
    pid = int(lease["pid"])
    if pid == os.getpid():
      if any(held.lease and held.lease["token"] == lease.get("token") for held in _held.values()):
        return None
      return "left by an earlier run of this process"
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return "its process is gone"
    except PermissionError:
      pass
  return None


_held: dict[str, "WorkdirLock"] = {}  # path -> the lock this process holds (re-entered by nested users)


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir's lease (re-entrant within a process)."""

  def __init__(self, workdir: str, log=None):
    self.workdir = str(workdir)
    self.path = paths.join(paths.absolute(workdir), LEASE)
    self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    self._depth = 0
    self._stop = threading.Event()
    self._thread = None
    self.lease = None
    self.backend = None

  def __enter__(self):
    outer = _held.get(self.path)
    if outer is not None:
      outer._depth += 1
      return outer
    if os.environ.get("MM15_NO_WORKDIR_LOCK", "") not in ("", "0"):
      return self
    problem = None
    if jax.process_index() == 0:
      try:
        self._acquire()
      except errors.RunError as e:
        problem = e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      refused = bool(multihost_utils.broadcast_one_to_all(np.int32(problem is not None)))
      if refused and problem is None:
        raise errors.RunError(f"workdir {self.workdir} is in use by another run (see process 0)")
    if problem is not None:
      raise problem
    self._depth = 1
    _held[self.path] = self
    return self

  def __exit__(self, *exc):
    holder = _held.get(self.path)
    if holder is None:  # MM15_NO_WORKDIR_LOCK
      return
    holder._depth -= 1
    if holder is not self or self._depth:
      return
    del _held[self.path]
    if self.backend is not None:
      self._stop.set()
      self._thread.join()
      self.backend.release(self.lease)

  def _acquire(self):
    epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
    # Generation preconditions are Cloud Storage's: other object stores have no lease backend here.
    self.backend = _GcsLease(self.path) if self.path.startswith("gs://") else _LocalLease(self.path)
    now = time.time()
    self.lease = {"host": socket.gethostname(), "pid": os.getpid(),
                  "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "refreshed": now,
                  "token": uuid.uuid4().hex}
    for _ in range(3):
      if self.backend.create(self.lease):
        break
      holder = self.backend.read()
      if holder is None:
        continue  # released meanwhile
      why = _stale(holder)
      if why is None:
        raise errors.RunError(f"workdir {self.workdir} is in use by {_holder(holder)}; stop that run first "
                              f"(the lease is {self.path})")
      if self.backend.take_over(holder, self.lease):
        self.log(f"WARNING: took over the workdir lease {self.path} of {_holder(holder)}: {why}")
        break
    else:
      raise errors.RunError(f"workdir {self.workdir}: could not take the lease {self.path} (others keep taking it)")
    self._thread = threading.Thread(target=self._refresh, name="mm15-workdir-lease", daemon=True)
    self._thread.start()

  def _refresh(self):
    while not self._stop.wait(ttl_s() / 4):
      self.lease["refreshed"] = time.time()
      try:
        if not self.backend.refresh(self.lease):
          self.log(f"WARNING: the workdir lease {self.path} was taken over by another run; this run no longer "
                   f"holds the workdir")
          return
      except OSError as e:  # storage hiccup: the next refresh tries again, before the lease expires
        self.log(f"WARNING: could not refresh the workdir lease {self.path}: {e}")


def holds_workdir(fn):
  """Decorator: `fn(exp, index, workdir, ...)` runs holding `workdir`'s lease."""
  signature = inspect.signature(fn)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    workdir = signature.bind(*args, **kwargs).arguments["workdir"]
    with WorkdirLock(workdir):
      return fn(*args, **kwargs)
  return wrapper
