"""Tracking and profiling of the stage runner: an offline W&B run holds the JSONL's scalars and continues on resume;
profile.steps leaves a jax.profiler trace, also when the run stops early."""
import glob
import json
import os
import struct
import sys

import jax
import jax.numpy as jnp
import pytest

from fixtures import compilation_cache, corpus_dir, tiny_experiment, with_stage  # noqa: F401 (fixtures)
from mm15_jax import config as config_lib
from mm15_jax import errors, layout
from mm15_jax.train import runner, wandb_log

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402


def quiet(*_):
  pass


@pytest.fixture(scope="module")
def exp(corpus_dir):
  return tiny_experiment(corpus_dir, steps=4)


def jsonl(workdir, exp) -> list[dict]:
  with open(os.path.join(layout.stage_dir(workdir, exp.stages[0]), "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def wandb_records(path: str):
  """The protobuf Records of a W&B transaction log (run-<id>.wandb): a 7-byte file header (":W&B", magic, version),
  then LevelDB-log records (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
  data = open(path, "rb").read()
  assert data[:4] == b":W&B", path
  pos, block, parts = 7, 32768, []
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header is padding
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    parts.append(data[pos + 7:pos + 7 + length])
    pos += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(b"".join(parts))
      parts = []
      yield record


def offline_runs(wandb_dir) -> dict[str, list[str]]:
  """{run id: its transaction logs, oldest first} under WANDB_DIR."""
  runs = {}
  for path in sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb"))):
    runs.setdefault(os.path.basename(path)[len("run-"):-len(".wandb")], []).append(path)
  return runs


def history(path: str) -> dict[int, dict]:
  """{step: {key: value}} of the history rows in one transaction log."""
  rows = {}
  for record in wandb_records(path):
    if record.WhichOneof("record_type") == "history":
      row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
      rows[row["_step"]] = row
  return rows


def run_config(path: str) -> dict:
  for record in wandb_records(path):
    if record.WhichOneof("record_type") == "run":
      return {u.key: json.loads(u.value_json) for u in record.run.config.update}
  raise AssertionError(f"{path}: no run record")


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
  directory = tmp_path / "wandb_dir"
  directory.mkdir()
  for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(directory), "WANDB_SILENT": "true",
                     "WANDB_CONSOLE": "off"}.items():
    monkeypatch.setenv(key, value)
  return str(directory)


def test_wandb_offline_run_holds_the_logged_scalars_and_resumes(exp, tmp_path, offline_wandb):
  exp = config_lib.override(with_stage(exp, 0), ["logging.wandb=my-team/mm15", "logging.wandb_mode=offline"])
  workdir = str(tmp_path / "work")
  runner.run_stage(exp, 0, workdir, log=quiet)

  id_file = os.path.join(layout.stage_dir(workdir, exp.stages[0]), wandb_log.RUN_ID_FILE)
  run_id = open(id_file).read().strip()
  assert list(offline_runs(offline_wandb)) == [run_id]
  (first,) = offline_runs(offline_wandb)[run_id]
  logged = jsonl(workdir, exp)
  rows = history(first)
  assert sorted(rows) == [r["step"] for r in logged] == [1, 2, 3, 4]
  for record in logged:  # the same scalars, the same values, at the same steps
    row = rows[record["step"]]
    assert {k: row[k] for k in record if k != "step"} == {k: v for k, v in record.items() if k != "step"}
  config = run_config(first)
  assert config["logging"]["wandb"] == "my-team/mm15" and config["name"] == exp.name
  assert config["stages"][0]["steps"] == 4 and config["model"] == config_lib.to_dict(exp.model)

  # Resumed with two more steps: the same id, a second transaction log of that run with steps 5 and 6.
  longer = with_stage(exp, 0, steps=6)
  log = []
  runner.run_stage(longer, 0, workdir, log=log.append)
  assert any("resumed from step 4" in line for line in log)
  assert open(id_file).read().strip() == run_id
  runs = offline_runs(offline_wandb)
  assert list(runs) == [run_id] and len(runs[run_id]) == 2
  resumed = history(runs[run_id][1])
  assert sorted(resumed) == [5, 6]
  assert [resumed[s]["loss"] for s in (5, 6)] == [r["loss"] for r in jsonl(workdir, exp)[4:]]


def test_wandb_missing_is_one_line_naming_the_extra(exp, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
  exp = config_lib.override(with_stage(exp, 0), ["logging.wandb=mm15"])
  with pytest.raises(errors.UserError, match=r"^config key logging.wandb='mm15': the wandb package is not installed: "
                                             r"pip install -e '\.\[wandb\]'"):
    runner.run_stage(exp, 0, str(tmp_path), log=quiet)
  assert not os.path.exists(layout.stage_dir(str(tmp_path), exp.stages[0]))  # stopped before anything was written
  with pytest.raises(errors.UserError, match=r"pip install -e '\.\[wandb\]'"):
    config_lib.validate_inputs(exp, 0, str(tmp_path))
  off = config_lib.override(with_stage(exp, 0), ["logging.wandb_mode=disabled"])
  wandb_log.require_installed(off.logging)  # disabled: wandb not needed


def xplanes(workdir, exp) -> list[str]:
  return glob.glob(os.path.join(layout.profile_dir(workdir, exp.stages[0]), "plugins", "profile", "*", "*.xplane.pb"))


def test_profile_steps_write_a_trace(exp, tmp_path):
  exp = config_lib.override(with_stage(exp, 0), ["profile.steps=2:4"])
  workdir = str(tmp_path)
  log = []
  runner.run_stage(exp, 0, workdir, log=log.append)
  (trace,) = xplanes(workdir, exp)
  assert os.path.getsize(trace) > 0
  assert any("profile: tracing steps 2..3" in line for line in log), log


def test_profile_trace_stops_when_the_run_stops_early(exp, tmp_path, monkeypatch):
  real = runner.initial_params

  def poisoned(*args, **kwargs):  # every step non-finite: the run stops at step 2, inside the window
    graphdef, params, rest = real(*args, **kwargs)
    scale = params["decoder"]["final_norm"]["scale"]
    scale[...] = jnp.full_like(scale[...], jnp.nan)
    return graphdef, params, rest

  monkeypatch.setattr(runner, "initial_params", poisoned)
  exp = config_lib.override(with_stage(exp, 0, max_nonfinite_steps=2), ["profile.steps=1:4"])
  with pytest.raises(runner.NonFiniteError):
    runner.run_stage(exp, 0, str(tmp_path), log=quiet)
  assert len(xplanes(str(tmp_path), exp)) == 1
  jax.profiler.start_trace(str(tmp_path / "again"))  # raises if the run had left its trace running
  jax.profiler.stop_trace()
