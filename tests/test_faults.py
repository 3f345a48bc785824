"""Faults as an operator meets them, end to end on the tiny config: damaged checkpoints fall back to the step before,
a second launch on a workdir is refused, a full disk stops the run with one line, a truncated ArrayRecord file is
named, bad command lines exit 2 with one line and no traceback, a resumed run logs no step twice."""
import contextlib
import glob
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixtures import compilation_cache, corpus_dir, flat, tiny_experiment  # noqa: F401 (fixtures)
from mm15_jax import cli, errors, layout, sharding
from mm15_jax.data import pipeline as pipeline_lib
from mm15_jax.data import records
from mm15_jax.data.tokenizer import Tokenizer
from mm15_jax.train import checkpoint as ckpt_lib
from mm15_jax.train import stage as stage_lib
from mm15_jax.train import lock as lock_lib
from mm15_jax.train import runner
from mm15_jax.train import state as state_lib

STEPS = 4  # checkpoints at steps 2 and 4


def quiet(*_):
  pass


@pytest.fixture(scope="module")
def exp(corpus_dir):
  exp = tiny_experiment(corpus_dir, steps=STEPS)
  exp.stages[0].checkpoint_every = 2
  return exp


@pytest.fixture(scope="module")
def trained(exp, tmp_path_factory):
  """The one compiled run every test shares: stage 1 for 4 steps, checkpoints at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  runner.run_stage(exp, 0, workdir, log=quiet)
  return workdir


def metrics_rows(workdir, exp) -> list[dict]:
  with open(os.path.join(layout.stage_dir(workdir, exp.stages[0]), "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def like_state(exp):
  """What the runner restores onto: the abstract train state of stage 1 on its mesh."""
  tokenizer = Tokenizer(exp.stages[0].data.tokenizer)
  return stage_lib.build_stage(exp, 0, sharding.make_mesh(exp.mesh), vocab_size=tokenizer.vocab_size,
                               image_token_id=tokenizer.image_id, init="abstract").state


def host_leaves(state) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.device_get(jax.tree.leaves(state))]


def largest_file(directory: str) -> str:
  files = [p for p in glob.glob(os.path.join(directory, "**"), recursive=True) if os.path.isfile(p)]
  return max(files, key=os.path.getsize)


def flip_byte(path: str, offset: int = 0):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0x01]))


def garbage(directory: str):
  for path in glob.glob(os.path.join(directory, "**"), recursive=True):
    if os.path.isfile(path):
      with open(path, "w") as f:
        f.write("garbage{")


def without_manifest(damage):
  def both(step_dir):
    os.remove(os.path.join(step_dir, ckpt_lib.MANIFEST))
    damage(step_dir)
  return both


# Each damages step 4's folder as an operator found it damaged; step 2 must be restored.
DAMAGES = {
    "params_file_deleted": lambda d: os.remove(largest_file(os.path.join(d, "params"))),
    "params_file_truncated": lambda d: os.truncate(largest_file(os.path.join(d, "params")),
                                                   os.path.getsize(largest_file(os.path.join(d, "params"))) // 2),
    "garbage_meta": lambda d: garbage(os.path.join(d, "meta")),
    "garbage_data": lambda d: garbage(os.path.join(d, "data")),
    "emptied_step": lambda d: [shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
                               for p in glob.glob(os.path.join(d, "*"))],
    "params_folder_missing": lambda d: shutil.rmtree(os.path.join(d, "params")),
    "one_byte_flip": lambda d: flip_byte(largest_file(os.path.join(d, "params")), 100),
    # Without the manifest (a step saved before manifests existed) a failing restore is what catches it.
    "no_manifest_params_missing": without_manifest(lambda d: shutil.rmtree(os.path.join(d, "params"))),
    "no_manifest_garbage_meta": without_manifest(lambda d: garbage(os.path.join(d, "meta"))),
}


@pytest.fixture(scope="module")
def step2_state(trained, exp):
  checkpointer = ckpt_lib.Checkpointer(layout.checkpoint_dir(trained, exp.stages[0]), keep=3)
  state, meta = checkpointer.restore(2, like_state(exp), None)
  checkpointer.close()
  assert meta["step"] == 2
  return host_leaves(state)


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_step_falls_back_to_the_one_before(damage, trained, exp, step2_state, tmp_path):
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(layout.checkpoint_dir(trained, exp.stages[0]), directory)
  assert ckpt_lib.verify(os.path.join(directory, "4")) is None  # the manifest was written after the save
  DAMAGES[damage](os.path.join(directory, "4"))

  log = []
  checkpointer = ckpt_lib.Checkpointer(directory, keep=3)
  step, state, meta = checkpointer.restore_latest(like_state(exp), None, log.append)
  checkpointer.close()
  assert (step, meta["step"]) == (2, 2)
  for got, want in zip(host_leaves(state), step2_state):
    np.testing.assert_array_equal(got, want)
  assert len(log) == 1 and log[0].startswith(f"WARNING: checkpoint step 4 in {directory} is damaged"), log
  moved = glob.glob(directory + "-damaged/4.*")
  assert len(moved) == 1 and moved[0] in log[0]  # set aside, not deleted
  assert "4" not in os.listdir(directory) and "2" in os.listdir(directory)
  if not damage.startswith("no_manifest"):
    # Readers of the directory (init_from, eval) skip a damaged step too, without moving anything.
    shutil.move(moved[0], os.path.join(directory, "4"))
    assert ckpt_lib.newest_intact_step(directory) == 2 and ckpt_lib.read_meta(directory)["step"] == 2
    assert os.path.isdir(os.path.join(directory, "4"))


def test_flipped_byte_resumes_from_the_step_before_and_logs_no_step_twice(trained, exp, tmp_path):
  """The silent case: a 1-byte flip in the newest params. The rerun warns, resumes from step 2, and ends exactly
  where the undamaged run ended; metrics.jsonl and TensorBoard hold each step once."""
  workdir = str(tmp_path / "work")
  shutil.copytree(trained, workdir)
  ckpt_dir = layout.checkpoint_dir(workdir, exp.stages[0])
  flip_byte(largest_file(os.path.join(ckpt_dir, "4", "params")), 100)

  log = []
  runner.run_stage(exp, 0, workdir, log=log.append)
  assert any(line.startswith("WARNING: checkpoint step 4") and "does not match its SHA-256" in line for line in log)
  assert any("resumed from step 2" in line for line in log), log
  rows = metrics_rows(workdir, exp)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert [r["loss"] for r in rows] == [r["loss"] for r in metrics_rows(trained, exp)]
  mesh = sharding.make_mesh(exp.mesh)
  got = flat(state_lib.restore_model_params(ckpt_dir, mesh)[2])
  want = flat(state_lib.restore_model_params(layout.checkpoint_dir(trained, exp.stages[0]), mesh)[2])
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # TensorBoard: the resumed run's event file purges steps >= 3, so every tag shows steps 1..4 once.
  for tag, steps in tensorboard_steps(os.path.join(layout.stage_dir(workdir, exp.stages[0]), "tb")).items():
    assert steps == [1, 2, 3, 4], (tag, steps)


def tensorboard_steps(logdir: str) -> dict[str, list[int]]:
  """{tag: steps} as TensorBoard shows them: event files in order, a SessionLog START at step s drops steps >= s."""
  from tensorboardX.proto import event_pb2
  shown: dict[str, list[int]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        shown = {tag: [s for s in steps if s < event.step] for tag, steps in shown.items()}
      for value in event.summary.value:
        shown.setdefault(value.tag, []).append(event.step)
  return shown


def test_a_nonfinite_state_is_never_saved(trained, exp, step2_state, tmp_path):
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(layout.checkpoint_dir(trained, exp.stages[0]), directory)
  checkpointer = ckpt_lib.Checkpointer(directory, keep=3)
  _, state, _ = checkpointer.restore_latest(like_state(exp), None, quiet)
  leaves, treedef = jax.tree.flatten(state)
  last_float = max(i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating))
  poisoned = [x.at[(0,) * x.ndim].set(jnp.inf) if i == last_float else x for i, x in enumerate(leaves)]
  with pytest.raises(errors.RunError, match=r"step 6: the train state holds NaN or Inf.*newest complete "
                                             r"checkpoint .* is step 4"):
    checkpointer.save(6, jax.tree.unflatten(treedef, poisoned), None, {"step": 6})
  checkpointer.close()
  assert sorted(os.listdir(directory)) == ["2", "4"]


# --- the workdir lease -----------------------------------------------------------------------------------------

def write_lease(workdir, **fields):
  lease = {"host": socket.gethostname(), "pid": 0, "start": "2026-01-01T00:00:00Z", "refreshed": time.time(),
           "token": "other"} | fields
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, lock_lib.LEASE), "w") as f:
    json.dump(lease, f)


def run_cli(argv) -> tuple[int, str]:
  """(exit code, stderr + stdout) of `mm15 argv` in this process."""
  out = io.StringIO()
  with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
    try:
      cli.entry(argv)
      code = 0
    except SystemExit as e:
      code = e.code
  return code, out.getvalue()


def test_second_launch_is_refused_naming_the_holder(exp, corpus_dir, tmp_path, monkeypatch):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    workdir = str(tmp_path / "work")
    write_lease(workdir, pid=holder.pid)
    monkeypatch.setattr(runner, "run_stage", lambda *a, **k: pytest.fail("trained despite the lease"))
    code, out = run_cli(["train", "--config", "tiny", "--arg", f"data_dir={corpus_dir}", "--workdir", workdir])
    assert code == 1
    assert out.strip() == (f"mm15: workdir {workdir} is in use by host {socket.gethostname()} pid {holder.pid} "
                           f"since 2026-01-01T00:00:00Z (refreshed 0 s ago); stop that run first (the lease is "
                           f"{os.path.join(workdir, lock_lib.LEASE)})"), out
    monkeypatch.undo()
    with pytest.raises(errors.RunError, match=f"pid {holder.pid}"):  # the API refuses too, before any compile
      runner.run_stage(exp, 0, workdir, log=quiet)
  finally:
    holder.kill()
    holder.wait()


def test_stale_leases_are_taken_over_with_a_warning(tmp_path):
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  cases = {"its process is gone": dict(pid=gone.pid),
           "not refreshed for over 120 s": dict(host="elsewhere", pid=1, refreshed=time.time() - 1000)}
  for why, fields in cases.items():
    workdir = str(tmp_path / why.split()[0])
    write_lease(workdir, **fields)
    log = []
    with lock_lib.WorkdirLock(workdir, log=log.append):
      lease = json.load(open(os.path.join(workdir, lock_lib.LEASE)))
      assert (lease["host"], lease["pid"]) == (socket.gethostname(), os.getpid())
      with lock_lib.WorkdirLock(workdir):  # re-entrant within the process (the CLI, then run_stage)
        pass
      assert os.path.exists(os.path.join(workdir, lock_lib.LEASE))
    assert len(log) == 1 and log[0].startswith("WARNING: took over the workdir lease") and why in log[0], log
    assert not os.path.exists(os.path.join(workdir, lock_lib.LEASE))  # released on exit


def test_lease_is_refreshed_while_held(tmp_path, monkeypatch):
  monkeypatch.setenv("MM15_LOCK_TTL_S", "0.4")
  path = os.path.join(tmp_path, lock_lib.LEASE)
  with lock_lib.WorkdirLock(str(tmp_path)):
    first = json.load(open(path))["refreshed"]
    deadline = time.monotonic() + 10
    while json.load(open(path))["refreshed"] == first:
      assert time.monotonic() < deadline, "lease never refreshed"
      time.sleep(0.05)
    time.sleep(0.5)  # longer than the TTL: still held, because it is refreshed
    assert lock_lib._stale(json.load(open(path))) is None


# --- a full disk during an asynchronous save -------------------------------------------------------------------

def _tmpfs(path: str, size: int) -> bool:
  os.makedirs(path, exist_ok=True)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                        capture_output=True).returncode == 0


def _disk_bytes(folder: str) -> int:
  return sum(-(-os.path.getsize(p) // 4096) * 4096
             for p in glob.glob(os.path.join(folder, "**"), recursive=True) if os.path.isfile(p))


def test_full_disk_stops_the_run_with_one_line(trained, exp, tmp_path):
  # The run resumes from step 2 on a filesystem left with room for a quarter of a step, so the save at step 4 fails.
  # (A filesystem sized to hold "one step but not two" is not deterministic: a step's size varies with how the
  # writer threads batch their files.)
  step2 = os.path.join(layout.checkpoint_dir(trained, exp.stages[0]), "2")
  step_bytes = _disk_bytes(step2)
  workdir = str(tmp_path / "work")
  stage_dir, ckpt_dir = layout.stage_dir(workdir, exp.stages[0]), layout.checkpoint_dir(workdir, exp.stages[0])
  if not _tmpfs(stage_dir, step_bytes * 4):
    pytest.skip("cannot mount a tmpfs here (needs root)")
  try:
    shutil.copytree(step2, os.path.join(ckpt_dir, "2"))
    disk = os.statvfs(stage_dir)
    with open(os.path.join(stage_dir, "filler"), "wb") as f:
      f.write(b"\0" * (disk.f_bavail * disk.f_frsize - step_bytes // 4))
    long_exp = tiny_experiment(exp.stages[0].data.data_dir, steps=6)
    long_exp.stages[0].checkpoint_every = 2
    with pytest.raises(ckpt_lib.CheckpointSaveError) as info:
      runner.run_stage(long_exp, 0, workdir, log=quiet)
    message = str(info.value)
    assert message.startswith(f"checkpoint save at step 4 failed: no space left on device ({ckpt_dir}/4."), message
    assert message.endswith(f"step 2 is the newest complete checkpoint in {ckpt_dir}") and "\n" not in message
    assert sorted(os.listdir(ckpt_dir)) == ["2"], os.listdir(ckpt_dir)  # the temporary folder is gone
    assert ckpt_lib.verify(os.path.join(ckpt_dir, "2")) is None
    assert max(r["step"] for r in metrics_rows(workdir, exp)) <= 6
    code, out = run_cli_error(info.value)
    assert code == 1 and out == f"mm15: {message}\n"
  finally:
    subprocess.run(["umount", stage_dir], check=True)


def run_cli_error(exc) -> tuple[int, str]:
  """What `mm15` prints for an exception raised by a command."""
  real = cli.main
  cli.main = lambda argv: (_ for _ in ()).throw(exc)
  try:
    return run_cli(["train"])
  finally:
    cli.main = real


# --- data -----------------------------------------------------------------------------------------------------

def test_truncated_array_record_names_the_file(corpus_dir, tmp_path):
  data_dir = str(tmp_path / "data")
  shutil.copytree(os.path.join(corpus_dir, "text"), os.path.join(data_dir, "text"))
  (path,) = glob.glob(os.path.join(data_dir, "text", "*", "text-train.array_record-*"))
  os.truncate(path, os.path.getsize(path) // 2)
  source = records.open_source(data_dir, "text", "train")
  with pytest.raises(ValueError, match=rf"^text/train\[3\]: cannot read the record from {path} .*damaged or "
                                       rf"truncated"):
    source[3]
  # The training pipeline skips bad records up to a limit, then stops naming the dataset and the file.
  stage = tiny_experiment(corpus_dir).stages[0]
  stage.data.data_dir, stage.data.mixture = data_dir, {"text": 1.0}
  batches = pipeline_lib.make_pipeline(stage.data, sources=pipeline_lib.open_sources(stage.data),
                                       tokenizer=Tokenizer(stage.data.tokenizer), tokens_per_tile=4, tile_size=16,
                                       batch_size=8, process_index=0, process_count=1, seed=0)
  with pytest.raises(Exception, match=rf"source 'text': .*cannot read the record from {path}"):
    next(batches)


# --- the command line -----------------------------------------------------------------------------------------

def bad_cli_cases(data_dir: str, tmp: str) -> list[tuple[list[str], str]]:
  """(argv, text the one line must hold)."""
  train = ["train", "--config", "tiny", "--arg", f"data_dir={data_dir}", "--workdir", os.path.join(tmp, "wd")]
  afile = os.path.join(tmp, "afile")
  open(afile, "w").close()
  empty = os.path.join(tmp, "empty")
  os.makedirs(empty, exist_ok=True)
  return [
      (["train", "--config", "nope", "--workdir", tmp], "--config 'nope': not a built-in config"),
      (["config", "--config", os.path.join(tmp, "none.py")], "none.py: no such file"),
      (train + ["--arg", "nope=1"], "--arg nope: get_config() of --config tiny takes ['data_dir', 'scale']"),
      (train + ["--set", "stages.pretrain.learning_rate=true"], "'stages.pretrain.learning_rate': expected float"),
      (train + ["--set", "stages.pretrain.steps=1.5"], "'stages.pretrain.steps': expected int, got 1.5"),
      (train + ["--set", "stages.7.steps=1"], "'stages.7.steps': index 7 out of range"),
      (train + ["--set", "nokey=1"], "'nokey': Experiment has no field 'nokey'"),
      (train + ["--set", "stages.pretrain.checkpoint_every=0"], "stages.pretrain.checkpoint_every=0: must be a"),
      (train + ["--set", "stages.pretrain.log_every=0"], "stages.pretrain.log_every=0: must be a positive"),
      (train + ["--set", "stages.pretrain.batch_size=0"], "stages.pretrain.batch_size=0: must be a positive"),
      (train + ["--set", "stages.sft.eval_every=-1"], "stages.sft.eval_every=-1: must be >= 0"),
      (train + ["--set", "stages.pretrain.init_from=previous"], "the first stage has no previous stage"),
      (train + ["--set", "stages.ocr.name=pretrain"], "stages.1.name='pretrain': stage names must differ"),
      (train + ["--set", "mesh.data=3"], "needs 3 devices, have 8"),
      (train + ["--set", "mesh.fsdp=-1"], "at most one axis may be -1"),
      (train + ["--stage", "nope"], "--stage: unknown stage(s) ['nope']"),
      (["train", "--config", "tiny", "--arg", f"data_dir={tmp}/none", "--workdir", tmp],
       f"stages.pretrain.data.data_dir='{tmp}/none': no such folder"),
      (train + ["--set", f"stages.pretrain.data.tokenizer={tmp}/none.model"],
       f"stages.pretrain.data.tokenizer='{tmp}/none.model': not found"),
      (["train", "--config", "tiny", "--arg", f"data_dir={data_dir}", "--workdir", afile], "is a file, not a folder"),
      (["eval", "--config", "tiny", "--arg", f"data_dir={data_dir}", "--workdir", empty],
       f"checkpoint directory {empty}/sft/checkpoints does not exist"),
      (["convert-hf", "--vision", empty, "--decoder", empty, "--out", os.path.join(tmp, "out")],
       f"{empty} has no config.json"),
      (["train", "--workdir"], "expected one argument"),  # argparse's own
  ]


def test_bad_command_lines_exit_2_with_one_line(corpus_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(runner, "run_stage", lambda *a, **k: pytest.fail("compiled before rejecting the input"))
  for argv, want in bad_cli_cases(corpus_dir, str(tmp_path)):
    code, out = run_cli(argv)
    assert code == 2, (argv, out)
    assert want in out and "Traceback" not in out, (argv, out)
    if argv[0] != "train" or argv[1:] != ["--workdir"]:  # argparse prints its usage line too
      assert out.count("\n") == 1 and out.startswith("mm15"), (argv, out)


def test_the_command_prints_one_line_and_debug_the_traceback(corpus_dir, tmp_path):
  """The installed entry point, in a fresh process: one line without --debug, the traceback with it."""
  argv = [sys.executable, "-m", "mm15_jax.cli", "train", "--config", "tiny", "--arg", f"data_dir={corpus_dir}",
          "--workdir", str(tmp_path), "--set", "stages.pretrain.log_every=0"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("MM15_DEBUG", None)
  plain = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
  assert plain.returncode == 2
  assert plain.stderr.strip().splitlines()[-1] == "mm15: config key stages.pretrain.log_every=0: must be a positive " \
                                                  "integer", plain.stderr
  assert "Traceback" not in plain.stderr + plain.stdout
  debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True, env=env, timeout=300)
  assert debug.returncode == 2 and "Traceback" in debug.stderr and "log_every=0" in debug.stderr
