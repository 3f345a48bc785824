"""What a measurement ran on: the header of every benchmark record (date, CPU, load, library versions, command)."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform

VERSIONS_OF = ("jax", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "pillow", "torch", "transformers")


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                  platform.processor())
  except OSError:
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
  """Installed versions of the libraries a figure depends on (those not installed are left out)."""
  out = {"python": platform.python_version()}
  for name in VERSIONS_OF:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def describe(command: str) -> dict:
  """{date, machine: {cpus, cpu_model, load_avg}, versions, command}: load averages (1, 5, 15 min) say how shared
  the machine was while the figures were taken."""
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(),
                      "load_avg": [round(x, 2) for x in os.getloadavg()]},
          "versions": versions(), "command": command}
