"""Runs one command as N jax processes on this machine: multi-host training without a cluster.

    python launch/local.py --processes 2 --devices-per-process 4 -- \\
        mm15 train --config tiny --arg data_dir=runs/demo/data --workdir runs/multiprocess

Every process gets MM15_COORDINATOR=127.0.0.1:<free port>, MM15_NUM_PROCESSES, MM15_PROCESS_ID (read by
mm15_jax.train.distributed.initialize), JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=<devices per process> (CPU collectives go over gloo). Output lines
are prefixed with [pN]. The launcher exits with the first non-zero exit status of a process (killing the others, which
would otherwise wait forever in a collective), else 0. SIGTERM / SIGINT to the launcher are passed to every process
(a preemption drill). `--dry-run` prints the commands and environments and starts nothing.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

KILL_GRACE_S = 10.0  # after a failure: SIGTERM to the others, SIGKILL to those still alive this much later


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, devices_per_process: int, port: int) -> dict[str, str]:
  """The variables one process gets on top of the launcher's environment."""
  xla_flags = os.environ.get("XLA_FLAGS", "").split()
  xla_flags = [f for f in xla_flags if not f.startswith("--xla_force_host_platform_device_count")]
  xla_flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
  return {"MM15_COORDINATOR": f"127.0.0.1:{port}", "MM15_NUM_PROCESSES": str(num_processes),
          "MM15_PROCESS_ID": str(process_id), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(xla_flags)}


def _stream(proc: subprocess.Popen, prefix: str, out, lock: threading.Lock) -> None:
  for line in iter(proc.stdout.readline, b""):
    with lock:
      out.write(f"{prefix} {line.decode(errors='replace')}".rstrip("\n") + "\n")
      out.flush()


def _stop(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    if p.poll() is None:
      p.terminate()
  deadline = time.monotonic() + KILL_GRACE_S
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0.01))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch(command: list[str], *, num_processes: int, devices_per_process: int, port: int = 0,
           out=sys.stdout) -> int:
  """Runs `command` as `num_processes` processes; returns the launcher's exit status (see the module doc)."""
  port = port or free_port()
  lock = threading.Lock()
  procs, threads = [], []
  for pid in range(num_processes):
    env = dict(os.environ, **process_env(pid, num_processes, devices_per_process, port))
    p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    procs.append(p)
    t = threading.Thread(target=_stream, args=(p, f"[p{pid}]", out, lock), daemon=True)
    t.start()
    threads.append(t)

  def forward(signum, frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  status = 0
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        pid, status = failed[0]
        status = 128 - status if status < 0 else status  # killed by signal N -> 128 + N, as a shell reports it
        with lock:
          out.write(f"[launch] process {pid} exited with status {status}; stopping the others\n")
          out.flush()
        _stop(procs)
        break
      if all(c == 0 for c in codes):
        break
      time.sleep(0.05)
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    _stop(procs)
    for t in threads:
      t.join(timeout=5)
  return status


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", "-n", type=int, default=2)
  parser.add_argument("--devices-per-process", type=int, default=4, help="fake CPU devices in each process")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  parser.add_argument("--dry-run", action="store_true", help="print the commands and environments, start nothing")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
  a = parser.parse_args(argv)
  command = a.command[1:] if a.command[:1] == ["--"] else a.command
  if not command:
    parser.error("no command given (e.g. -- python -m mm15_jax.cli train --config tiny)")
  if a.processes < 1 or a.devices_per_process < 1:
    parser.error("--processes and --devices-per-process must be >= 1")
  if a.dry_run:
    port = a.port or free_port()
    for pid in range(a.processes):
      env = process_env(pid, a.processes, a.devices_per_process, port)
      print(f"[p{pid}] " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(command))
    return 0
  return launch(command, num_processes=a.processes, devices_per_process=a.devices_per_process, port=a.port)


if __name__ == "__main__":
  sys.exit(main())
