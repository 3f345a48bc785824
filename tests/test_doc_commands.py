"""Every command the documentation shows still resolves: the `mm15 ...` lines of README.md and of the config and
launcher docstrings, and the `python launch/*.py ...` lines.

Resolving, in this process (no subprocess, no compile, no data): the `mm15` parser parses the command; train, eval,
aot and config commands then build their experiment from --config / --arg / --set (an unknown key fails), demo
applies its --set to the demo config, params looks its model up; a launcher runs with --dry-run (it prints its
gcloud / xpk commands) and the `mm15 train` arguments it passes on resolve too. A command naming a subcommand
without its arguments (prose such as "`mm15 data synth` writes ...") resolves as `--help`. `...` stands for
arguments left out: it is dropped (with a stand-in --workdir where a train command then lacks one).
"""
import ast
import contextlib
import glob
import importlib.util
import io
import os
import re
import shlex

import pytest

from mm15_jax import cli, config as config_lib, errors
from mm15_jax.configs import presets, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND_START = re.compile(r"^(?:\$ )?(mm15 |python3? launch/\w+\.py|python3? -m mm15_jax\.cli )")
# Stands in for a config file the reader writes (`--config my_experiment.py`).
TINY_FILE = os.path.join(ROOT, "configs", "tiny.py")


def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
  out, pending = [], None
  for n, line in lines:
    text = line.rstrip()
    if pending is not None:
      pending = (pending[0], pending[1] + " " + text.strip().rstrip("\\").strip())
    else:
      pending = (n, text.strip().rstrip("\\").strip())
    if not text.endswith("\\"):
      out.append(pending)
      pending = None
  if pending is not None:
    out.append(pending)
  return out


def _commands_in_block(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
  """Commands of a code block: continuation lines joined, comments and `&&`-chained setup dropped."""
  found = []
  for n, line in _join_continuations(lines):
    for part in line.split(" && "):
      part = part.strip()
      if COMMAND_START.match(part):
        found.append((n, part))
  return found


def readme_commands() -> list[tuple[str, str]]:
  path = os.path.join(ROOT, "README.md")
  with open(path) as f:
    lines = f.read().splitlines()
  found, block, in_fence = [], [], False
  for n, line in enumerate(lines, 1):
    if line.lstrip().startswith("```"):
      if in_fence:
        found += _commands_in_block(block)
        block = []
      in_fence = not in_fence
      continue
    if in_fence:
      block.append((n, line))
      continue
    # Commands indented in a list item, and inline `mm15 ...` spans.
    stripped = line.strip()
    if line.startswith("   ") and COMMAND_START.match(stripped):
      block.append((n, line))
      if not stripped.endswith("\\"):
        found += _commands_in_block(block)
        block = []
      continue
    if block:  # a continuation of an indented command
      block.append((n, line))
      if not stripped.endswith("\\"):
        found += _commands_in_block(block)
        block = []
      continue
    for span in re.findall(r"`([^`]+)`", line):
      if COMMAND_START.match(span):
        found.append((n, span))
  return [(f"README.md:{n}", cmd) for n, cmd in found]


def docstring_commands() -> list[tuple[str, str]]:
  found = []
  paths = glob.glob(os.path.join(ROOT, "configs", "*.py")) + glob.glob(os.path.join(ROOT, "launch", "*.py"))
  for path in sorted(paths):
    with open(path) as f:
      doc = ast.get_docstring(ast.parse(f.read()), clean=False) or ""
    lines = doc.splitlines()
    rel = os.path.relpath(path, ROOT)
    block = []
    for n, line in enumerate(lines, 1):
      if line.startswith("    ") or (block and block[-1][1].rstrip().endswith("\\")):
        block.append((n, line))
        continue
      found += [(f"{rel}:{m}", c) for m, c in _commands_in_block(block)]
      block = []
    found += [(f"{rel}:{m}", c) for m, c in _commands_in_block(block)]
  return found


def _argv(command: str) -> list[str]:
  """Shell words without the comment, `...` and the brackets of optional groups (`[--upcycle --moe-every 2]`)."""
  argv = shlex.split(command, comments=True)
  if "..." in argv and "--workdir" not in argv and ("train" in argv or "--" in argv):
    argv.append("--workdir=runs/elided")  # what `...` leaves out may include the required --workdir
  argv = [a for a in argv if a != "..."]
  argv = [a[1:] if a.startswith("[-") else a for a in argv]
  argv = [a[:-1] if a.endswith("]") and "[" not in a else a for a in argv]
  # A config file the reader writes (`--config my_experiment.py`) is stood in for by a shipped one.
  return [TINY_FILE if a.endswith(".py") and i and argv[i - 1] == "--config" and not os.path.exists(a) else a
          for i, a in enumerate(argv)]


def resolve_mm15(argv: list[str]) -> str:
  """Parses `mm15 ARGV` with the real parser and resolves what the subcommand would build; returns a summary."""
  resolved = []

  def config_command(a):
    exp = cli.load_experiment(a.config, a.arg, a.set)
    resolved.append(f"{a.command}: {exp.name}")

  def demo(a):
    exp = config_lib.override(tiny.get_config(), list(a.set))
    resolved.append(f"demo: {exp.name}")

  def params(a):
    presets.get(a.model)
    resolved.append(f"params: {a.model}")

  def parse_only(a):
    resolved.append(a.command)

  subcommand = argv[0] if argv else ""
  if argv == [subcommand] and subcommand not in ("demo", "params", "config"):
    argv = [*argv, "--help"]
  if argv[:2] in (["data", "synth"], ["data", "convert"], ["eval", "import"]) and len(argv) == 2:
    argv = [*argv, "--help"]
  patched = {"cmd_train": config_command, "cmd_aot": config_command, "cmd_eval": config_command,
             "cmd_config": config_command, "cmd_demo": demo, "cmd_params": params, "cmd_synth": parse_only,
             "cmd_convert": parse_only, "cmd_convert_hf": parse_only, "cmd_eval_import": parse_only,
             "cmd_generate": config_command, "cmd_export_hf": parse_only, "cmd_ablate": config_command}
  saved = {name: getattr(cli, name) for name in patched}
  out = io.StringIO()
  try:
    for name, fn in patched.items():
      setattr(cli, name, fn)
    with contextlib.redirect_stdout(out):
      try:
        cli.main(argv)
      except SystemExit as e:
        if e.code not in (0, None):  # --help exits 0
          raise
        resolved.append("--help")
  finally:
    for name, fn in saved.items():
      setattr(cli, name, fn)
  return "; ".join(resolved)


def _launcher(script: str):
  spec = importlib.util.spec_from_file_location(f"launch_{script}", os.path.join(ROOT, "launch", script))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def resolve_launcher(script: str, argv: list[str]) -> str:
  """--dry-run (before `--`), then the command it passes on resolves as well."""
  split = argv.index("--") if "--" in argv else len(argv)
  own, passed = argv[:split], argv[split + 1:]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    status = _launcher(script).main([*own, "--dry-run", "--", *passed] if passed else [*own, "--dry-run"])
  assert status == 0 and out.getvalue(), f"{script} --dry-run printed nothing (status {status})"
  if script == "local.py":  # a whole command follows `--`
    if passed[:1] == ["mm15"]:
      return resolve_mm15(passed[1:])
    if passed[:3] == ["python", "-m", "mm15_jax.cli"]:
      return resolve_mm15(passed[3:])
    return "dry-run"
  return resolve_mm15(["train", *passed]) if passed else "dry-run"


def resolve(command: str) -> str:
  argv = _argv(command)
  if argv[0] == "$":
    argv = argv[1:]
  if argv[0] == "mm15":
    return resolve_mm15(argv[1:])
  if argv[:3] in (["python", "-m", "mm15_jax.cli"], ["python3", "-m", "mm15_jax.cli"]):
    return resolve_mm15(argv[3:])
  script = os.path.basename(argv[1])
  return resolve_launcher(script, argv[2:])


DOC_COMMANDS = docstring_commands()
README_COMMANDS = readme_commands()


def test_the_docs_show_commands():
  """The extraction finds the commands it is meant to check (a broken extractor would check nothing)."""
  places = {where.split(":")[0] for where, _ in DOC_COMMANDS}
  assert {"configs/mm15.py", "configs/tiny.py", "configs/presets.py", "launch/tpu_vm.py", "launch/xpk.py",
          "launch/local.py"} <= places
  assert any(cmd.startswith("python launch/tpu_vm.py") and "--workdir" in cmd for _, cmd in DOC_COMMANDS)
  assert len(README_COMMANDS) >= 10


@pytest.mark.parametrize("where,command", DOC_COMMANDS, ids=[w for w, _ in DOC_COMMANDS])
def test_docstring_command_resolves(where, command):
  resolve(command)


@pytest.mark.parametrize("where,command", README_COMMANDS, ids=[w for w, _ in README_COMMANDS])
def test_readme_command_resolves(where, command):
  resolve(command)


@pytest.mark.parametrize("command,message", [
    ("mm15 train --config mm15 --set data_dir=gs://b/d --workdir w", "data_dir"),
    ("mm15 train --config mm15 --set model=3b-moe --workdir w", "model"),
    ("mm15 config --config mm15 --arg sise=3b", "sise"),
    ("mm15 train --config tiny --workdir w --stages sft", "--stages"),
    ("python launch/xpk.py --cluster c --image i --tpu-type v5p-8 --workload Bad -- --workdir w", "SystemExit"),
    ("python launch/tpu_vm.py --name n --zone us-east5-a --accelerator-type a --version v -- --config mm15 "
     "--set mesh.fsdpp=2 --workdir w", "fsdpp"),
])
def test_a_wrong_command_fails(command, message, capsys):
  """The checks above can fail: the mistakes the documentation used to make are caught."""
  with pytest.raises((SystemExit, TypeError, KeyError, ValueError, errors.UserError)) as e:
    resolve(command)
  assert message in str(e.value) + capsys.readouterr().err + type(e.value).__name__
