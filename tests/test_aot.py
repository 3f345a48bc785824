"""Ahead-of-time compile of the real train step: per-device memory report on the local CPU mesh and, with libtpu,
on a TPU topology."""
import math

import pytest

from mm15_jax import cli
from mm15_jax.kernels import splash
from mm15_jax.models import count
from mm15_jax.train import aot, flops
from mm15_jax.train import stage as stage_lib

# The tiny experiment, made smaller so the compile is quick: batch 8 (one row per CPU device), 64 tokens.
SMALL = ["model.decoder.vocab_size=512", "model.decoder.num_layers=2", "stages.pretrain.batch_size=8",
         "stages.pretrain.data.seq_len=64", "stages.pretrain.data.max_images=2"]


def _tpu_available() -> bool:
  from jax._src import xla_bridge
  return xla_bridge.get_tpu_library_path() is not None


def _param_count(exp) -> int:
  return count.count(stage_lib.stage_model_config(exp.model, exp.stages[0], 512))["all"]["total"]


def test_cpu_compile_reports_memory_and_flops():
  exp = cli.load_experiment("tiny", [], SMALL)
  _, r = aot.compile_train_step(exp, 0, "cpu")
  assert r.num_devices == 8 and r.mesh["data"] == 8 and r.device_kind == "cpu"
  # data parallel: every device holds all float32 parameters.
  assert r.params_bytes == 4 * _param_count(exp)
  assert 0 < r.opt_state_bytes < r.params_bytes  # AdaFactor's factored second moments
  # one row of each batch array per device: 4 int32/float32 [64] rows, source_ids, images [2, 32, 32, 3], mask [2],
  # image_extent int32 [2, 4] (tiles enlarged in the model: data.split.enlarge_on_device)
  assert r.batch_bytes == 6 * 64 * 4 + 2 * 32 * 32 * 3 + 2 + 2 * 4 * 4
  assert r.batch_shapes["images"] == (8, 2, 32, 32, 3) and r.batch_shapes["image_extent"] == (8, 2, 4)
  assert r.temp_bytes > 0 and r.flops > 0 and r.kernel_flops == 0  # blocked attention on CPU: XLA counts it
  assert r.total_bytes >= r.params_bytes + r.opt_state_bytes
  assert r.hbm_bytes is None and r.fits is None
  text = aot.format_report(r)
  assert f"{r.params_bytes / 2**20:8.2f} MiB" in text.splitlines()[3]
  assert "HBM unknown" in text and f"{r.flops:.3e} per device" in text
  assert r.scanned_layers and "scanned layer stack once" in text  # tiny scans its layers


def test_fits_against_chip_hbm():
  r = aot.AotReport(topology="v5e:2x2", device_kind="TPU v5 lite", num_devices=4, mesh={"data": 4}, stage="s",
                    batch_shapes={"tokens": (4, 8), "images": (4, 1, 8, 8, 3)}, params_bytes=8 << 30,
                    opt_state_bytes=2 << 30, batch_bytes=0, temp_bytes=7 << 30, code_bytes=0,
                    total_bytes=17 << 30, hbm_bytes=aot.HBM_BYTES["TPU v5 lite"], flops=1e12)
  assert r.fits is False
  assert "17.00 GiB  of    16.00 GiB HBM: DOES NOT FIT" in aot.format_report(r)
  assert aot.HBM_BYTES["TPU v5"] == 95 << 30


def test_missing_libtpu_names_the_install_command(monkeypatch, capsys):
  import jax
  from jax._src import xla_bridge
  monkeypatch.setattr(xla_bridge, "get_tpu_library_path", lambda: None)
  with pytest.raises(SystemExit) as e:
    cli.main(["aot", "--config", "tiny", "--topology", "v5p:2x2x1"])
  assert f"pip install 'jax[tpu]=={jax.__version__}'" in str(e.value)
  with pytest.raises(ValueError, match="--num-slices"):
    aot.topology_devices("cpu", num_slices=2)


@pytest.mark.skipif(not _tpu_available(), reason="libtpu not installed (pip install -e '.[tpu]'): no TPU compile")
def test_tpu_topology_compile():
  exp = cli.load_experiment("tiny", [], SMALL)
  _, r = aot.compile_train_step(exp, 0, "v5e:2x2")
  assert (r.num_devices, r.device_kind, r.mesh["data"]) == (4, "TPU v5 lite", 4)
  assert r.params_bytes == 4 * _param_count(exp)
  assert r.hbm_bytes == 16 << 30 and r.fits is True
  assert r.flops > 0 and r.code_bytes > 0
  assert math.isfinite(r.flops)
  # model.attention=auto is splash attention on TPU: its FLOPs, which XLA's cost analysis does not see, are added
  model = stage_lib.stage_model_config(exp.model, exp.stages[0], 512)
  forward = flops.attention_core_forward_flops(model, batch_size=8, seq_len=64, max_images=2, tile_size=32)
  assert r.kernel_flops == pytest.approx(forward * splash.train_flops_per_forward(model.remat) / 4)
  assert forward > 0


@pytest.mark.skipif(not _tpu_available(), reason="libtpu not installed (pip install -e '.[tpu]'): no TPU devices")
@pytest.mark.parametrize("size", ["1b", "1b-moe"])
def test_paper_preset_optimizer_state_is_factored_and_sharded(size):
  """The 1B presets on 64 v5p chips with fsdp=64: AdaFactor's state is a sliver of the parameters (factored moments,
  attention kernels included) and stays sharded (never a full copy per chip). Abstract: nothing is compiled."""
  import jax

  from mm15_jax import sharding
  from mm15_jax.train import optim, state as state_lib
  exp = cli.load_experiment("mm15", [f"size={size}"], ["mesh.data=1", "mesh.fsdp=-1"])
  mesh = sharding.make_mesh(exp.mesh, aot.topology_devices("v5p:4x4x4"))
  model_cfg = stage_lib.stage_model_config(exp.model, exp.stages[0], exp.model.decoder.vocab_size)
  _, params, _ = state_lib.sharded_abstract_model(model_cfg, mesh)
  state = state_lib.abstract_train_state(params, optim.make_optimizer(exp.stages[0], params), mesh)
  total = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  assert total(state.opt_state) < 0.01 * total(params)
  assert aot.per_device_bytes(state.opt_state) < 0.05 * aot.per_device_bytes(state.params)


@pytest.mark.skipif(not _tpu_available(), reason="libtpu not installed (pip install -e '.[tpu]'): no TPU compile")
def test_refused_compile_reports_does_not_fit():
  """32k-token rows with dense attention (a [32k, 32k] float32 score square per head) need far more than a v5e
  chip's 16 GiB: the compiler refuses, the report says so with the temporaries it asked for instead of failing."""
  exp = cli.load_experiment("tiny", [], SMALL + ["stages.pretrain.data.seq_len=32768", "model.attention=dense"])
  compiled, r = aot.compile_train_step(exp, 0, "v5e:2x2")
  assert compiled is None and r.fits is False and "RESOURCE_EXHAUSTED" in r.out_of_memory
  assert r.temp_bytes > r.hbm_bytes and r.total_bytes > r.temp_bytes
  text = aot.format_report(r)
  assert "DOES NOT FIT" in text and "the compiler refused it" in text and "FLOPs" not in text


def test_fit_candidates():
  exp = cli.load_experiment("tiny", [], SMALL + ["stages.pretrain.batch_size=32"])
  import jax
  # 32 rows over 8 data devices: 4 per device, so grad_accum 1, 2, 4.
  assert aot.fit_candidates(exp, 0, "grad_accum", jax.devices()) == [
      "stages.pretrain.grad_accum=1", "stages.pretrain.grad_accum=2", "stages.pretrain.grad_accum=4"]
  assert aot.fit_candidates(exp, 0, "remat", jax.devices()) == ["model.remat=none", "model.remat=dots",
                                                                 "model.remat=full"]
  with pytest.raises(ValueError, match="--fit 'batch'"):
    aot.fit_candidates(exp, 0, "batch", jax.devices())


def _fake_compile(fits_from_accum):
  """compile_train_step stand-in: fits (on a 16 GiB chip) from grad_accum >= fits_from_accum; records calls."""
  calls = []

  def compile_train_step(exp, index, topology, num_slices=1):
    accum = exp.stages[index].grad_accum
    calls.append(accum)
    total = (8 if accum >= fits_from_accum else 20) << 30
    return None, aot.AotReport(
        topology=topology, device_kind="TPU v5 lite", num_devices=8, mesh={"data": 8}, stage=exp.stages[index].name,
        batch_shapes={"tokens": (8, 64), "images": (8, 2, 32, 32, 3)}, params_bytes=0, opt_state_bytes=0,
        batch_bytes=0, temp_bytes=total, code_bytes=0, total_bytes=total, flops=1.0,
        hbm_bytes=aot.HBM_BYTES["TPU v5 lite"] if topology != "cpu" else None)
  return compile_train_step, calls


def test_fit_search_stops_at_the_first_that_fits(monkeypatch, tmp_path):
  import json

  import jax
  exp = cli.load_experiment("tiny", [], SMALL + ["stages.pretrain.batch_size=64"])  # 8 rows per CPU device
  fake, calls = _fake_compile(fits_from_accum=4)
  monkeypatch.setattr(aot, "compile_train_step", fake)
  # The 8 local devices stand in for v5e:2x4's chips when the search counts rows per device (no libtpu needed).
  monkeypatch.setattr(aot, "topology_devices", lambda topology, num_slices=1: jax.devices())
  logged = []
  out = tmp_path / "aot.jsonl"
  reports = aot.command(exp, ["pretrain"], "v5e:2x4", json_path=str(out), overrides=("mesh.data=8",),
                        fit="grad_accum", log=logged.append)
  assert calls == [1, 2, 4] and [r.fits for r in reports] == [False, False, True]
  assert "stage pretrain fits with --set stages.pretrain.grad_accum=4 (8.00 of 16.00 GiB per chip)" in logged[-1]
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [line["overrides"] for line in lines] == [["mesh.data=8", f"stages.pretrain.grad_accum={g}"]
                                                   for g in (1, 2, 4)]
  assert exp.stages[0].grad_accum == 1  # candidates are copies

  fake, calls = _fake_compile(fits_from_accum=16)
  monkeypatch.setattr(aot, "compile_train_step", fake)
  aot.command(exp, ["pretrain"], "v5e:2x4", fit="grad_accum", log=logged.append)
  assert calls == [1, 2, 4, 8] and "fits with none of" in logged[-1]
  with pytest.raises(ValueError, match="--fit needs a chip whose HBM is known"):
    aot.command(exp, ["pretrain"], "cpu", fit="grad_accum", log=logged.append)
