"""Errors a user can act on: one line naming the file, record or config key and what to do.

`mm15` prints such an error as one line and exits 2 (bad input) or 1 (a run that failed); the Python traceback
appears only with `mm15 --debug ...` or MM15_DEBUG=1.
"""
from __future__ import annotations

import errno
import os
import re


class UserError(Exception):
  """Bad input (config, command line, data, checkpoint, storage): exit code 2."""
  exit_code = 2


class RunError(Exception):
  """A run that cannot go on (a failed save, a held workdir, non-finite steps): exit code 1."""
  exit_code = 1


# Exception types that, raised anywhere under a command, stem from what the user gave it (a path, a value).
INPUT_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError,
                KeyError, ValueError, TypeError, IndexError)


def debug() -> bool:
  return os.environ.get("MM15_DEBUG", "") not in ("", "0")


def _chain(exc: BaseException):
  """`exc`, its causes and contexts, and the members of exception groups, depth first."""
  seen, todo = set(), [exc]
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    todo.extend(getattr(e, "exceptions", ()) or ())
    todo.extend((e.__context__, e.__cause__))


# Storage failures as they appear in messages of libraries that do not raise OSError (TensorStore, gRPC).
_STORAGE_MESSAGES = {os.strerror(code).lower(): code for code in
                     (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO, errno.ENOENT)}


def root_cause(exc: BaseException, default_path: str = "") -> str:
  """The innermost actionable reason of `exc` as a short lower-case phrase, e.g. "no space left on device (PATH)";
  `default_path` names the file where no error in the chain does."""
  chain = list(_chain(exc))
  # The file: an OSError's own, else one a library names in its message (TensorStore: Error writing local file
  # "PATH": ...). A write that fails at close carries no filename, and the library's wrapper may hold it.
  paths = [e.filename for e in chain if isinstance(e, OSError) and e.filename]
  paths += [m.group(1) for e in chain for m in [re.search(r'"((?:/|gs://)[^"]+)"', str(e))] if m]
  where = f" ({paths[0] if paths else default_path})" if paths or default_path else ""
  for e in chain:
    if isinstance(e, OSError) and e.errno:
      return f"{os.strerror(e.errno).lower()}{where}"
  for e in chain:
    text = str(e)
    for phrase in _STORAGE_MESSAGES:
      if phrase in text.lower():
        return f"{phrase}{where}"
  innermost = chain[-1] if chain else exc
  lines = [line for line in str(innermost).splitlines() if line.strip()]
  return (lines[-1].strip() if lines else type(innermost).__name__)[:300]


def one_line(exc: BaseException) -> str:
  """An exception as the single line the command prints."""
  if isinstance(exc, KeyError) and exc.args:
    text = str(exc.args[0])
  else:
    text = str(exc)
  text = " ".join(text.split())
  if not isinstance(exc, (UserError, RunError)) and not isinstance(exc, (FileNotFoundError, NotADirectoryError)):
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
  return text


def _from_orbax(record) -> bool:
  import traceback
  if "/orbax/" in (record.pathname or ""):
    return True
  tb = record.exc_info[2] if record.exc_info else None
  return tb is not None and any("/orbax/" in frame.filename for frame in traceback.extract_tb(tb))


def _orbax_error_filter(record) -> bool:
  return record.levelno < 40 or not _from_orbax(record)  # 40: logging.ERROR


def quiet_library_reports() -> None:
  """The command line's reporting of a failed save is one line: Orbax's own reports of it (an error log with a
  traceback per background thread, TensorStore callbacks into the closed event loop) are left out unless MM15_DEBUG.
  """
  import logging
  import sys
  for name in ("absl", "asyncio"):
    logging.getLogger(name).addFilter(_orbax_error_filter)
  default = sys.excepthook

  def hook(kind, value, tb):
    if kind is RuntimeError and str(value) == "Event loop is closed":
      return
    default(kind, value, tb)
  sys.excepthook = hook
