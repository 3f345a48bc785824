"""Ahead-of-time compile of the real train step for a TPU topology, on any host: does a config fit the slice?

    mm15 aot --config mm15 --arg size=3b --stage pretrain --topology v5p:4x4x4
    mm15 aot --config tiny --topology cpu          # the local devices (CPU here)
    mm15 aot --config mm15 --arg size=3b --stage sft --topology v5p:4x4x4 --fit grad_accum   # first that fits
    mm15 aot --config tiny --set mesh.expert=4 --topology v5e:2x4 --hlo step.hlo   # also the compiled HLO text

The step, state shardings and batch shapes are exactly those of `mm15 train` (stage.build_stage, the
configured mesh, the stage's batch size, sequence length, image slots and tile size); nothing is allocated. TPU
topologies need libtpu (`pip install 'jax[tpu]==<jax version>'`), which compiles for chips it is not attached to.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import time

import jax
import numpy as np

from mm15_jax import paths, sharding
from mm15_jax import config as config_lib
from mm15_jax.config import Experiment
from mm15_jax.kernels import attention as attention_lib
from mm15_jax.train import flops as flops_lib
from mm15_jax.train import roofline
from mm15_jax.train import stage as stage_lib

GIB = 1 << 30
# HBM per device as jax names the device kind (v4 and v5p compile as megacore: one device per chip).
HBM_BYTES = {"TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB, "TPU v5": 95 * GIB, "TPU v5p": 95 * GIB,
             "TPU v6 lite": 32 * GIB}
MEGACORE = ("v4", "v5p", "v5")  # topology prefixes whose two TensorCores act as one device
# `--fit` knobs, each tried from the config's own value in order of falling activation memory. grad_accum keeps the
# global batch (a recipe setting) and halves the rows per chip each step; remat trades recompute for memory.
FIT_KNOBS = ("grad_accum", "remat")
REMAT_ORDER = ("none", "dots", "full")


@dataclasses.dataclass
class AotReport:
  topology: str
  device_kind: str
  num_devices: int
  mesh: dict[str, int]
  stage: str
  batch_shapes: dict[str, tuple[int, ...]]
  params_bytes: int          # per device, from the parameter shardings
  opt_state_bytes: int       # per device, from the optimiser state shardings
  batch_bytes: int           # per device
  temp_bytes: int            # activations and temporaries (memory_analysis)
  code_bytes: int            # generated code
  total_bytes: int           # arguments + outputs - aliased (donated state) + temporaries + code
  hbm_bytes: int | None      # per device, None when unknown (CPU, an unlisted chip)
  flops: float               # per device per step (cost_analysis)
  scanned_layers: bool = False  # XLA's cost analysis counts a scanned (while-loop) layer stack once
  compile_s: float = 0.0     # wall time of lower + compile on this host
  out_of_memory: str = ""    # the compiler's message when it refused the program for the chip's HBM
  bytes_accessed: float = float("nan")  # HBM bytes per device per step (cost_analysis)
  collective_bytes: dict[str, int] = dataclasses.field(default_factory=dict)  # sent per device, by kind (HLO)
  model_flops: float = float("nan")     # analytic (train/flops.py) per device per step
  kernel_flops: float = 0.0  # per device per step in Pallas attention kernels, analytic: `flops` does not count them

  @property
  def fits(self) -> bool | None:
    if self.out_of_memory:
      return False
    return None if self.hbm_bytes is None else self.total_bytes <= self.hbm_bytes


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """Devices to compile for: "cpu" (or "") the local ones; else a TPU topology such as "v5p:2x2x1"."""
  if topology in ("", "cpu", "local"):
    if num_slices != 1:
      raise ValueError("--num-slices needs a TPU --topology (the local devices are one slice)")
    return jax.devices()
  from jax._src import xla_bridge
  from jax.experimental import topologies
  if xla_bridge.get_tpu_library_path() is None:
    raise RuntimeError(
        f"--topology {topology}: compiling for TPU needs libtpu, which is not installed. Install it with "
        f"pip install 'jax[tpu]=={jax.__version__}'   (or: pip install -e '.[tpu]')")
  # Compile-only use claims no chip: do not take libtpu's one-process lock (a training job may hold it).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  kwargs = {"num_slices": num_slices}
  if topology.split(":")[0] in MEGACORE:
    kwargs["chip_config_name"] = "megacore"
  try:
    return topologies.get_topology_desc(topology, "tpu", **kwargs).devices
  except Exception as e:  # libtpu's message names the bad part (e.g. "v5p:3x3")
    raise ValueError(f"--topology {topology!r} (e.g. v5p:2x2x1, v5e:4x4, v6e:2x2, v4:2x2x2): libtpu: {e}") from e


def _vocab_and_image_id(exp: Experiment, index: int) -> tuple[int, int]:
  """The tokenizer's sizes when its file is readable here; else the config's vocab (the image id is then the last
  id: which id marks images changes neither shapes, memory nor FLOPs)."""
  stage = exp.stages[index]
  path = stage.data.tokenizer
  if path and paths.is_local(path) and os.path.exists(path):  # no object-store access for a compile
    from mm15_jax.data.tokenizer import Tokenizer
    tok = Tokenizer(path)
    return tok.vocab_size, tok.image_id
  vocab = exp.model.decoder.vocab_size
  if not vocab:
    raise ValueError(f"config key model.decoder.vocab_size is 0 (take the tokenizer's) but the tokenizer "
                     f"{path!r} of stage {stage.name} is not readable here: pass --set model.decoder.vocab_size=N")
  return vocab, vocab - 1


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard, i.e. device 0's)."""
  total = 0
  for x in jax.tree.leaves(tree):
    total += math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return total


def compile_train_step(exp: Experiment, index: int, topology: str = "cpu", num_slices: int = 1):
  """(compiled step, AotReport) for stage `index` of `exp` on `topology`."""
  stage = exp.stages[index]
  devices = topology_devices(topology, num_slices)
  if num_slices > 1 and exp.mesh.dcn_data != num_slices:
    if exp.mesh.dcn_data != 1:
      raise ValueError(f"config key mesh.dcn_data={exp.mesh.dcn_data} but --num-slices {num_slices}")
    exp = dataclasses.replace(exp, mesh=dataclasses.replace(exp.mesh, dcn_data=num_slices))
  vocab, image_id = _vocab_and_image_id(exp, index)
  mesh = sharding.make_mesh(exp.mesh, devices)
  if stage.batch_size % math.prod(mesh.shape[a] for a in sharding.BATCH_AXES):
    raise ValueError(f"config key stages.{stage.name}.batch_size={stage.batch_size} does not divide over the "
                     f"batch mesh axes {dict(mesh.shape)}")

  built = stage_lib.build_stage(exp, index, mesh, vocab_size=vocab, image_token_id=image_id)
  model_cfg, state, batch = built.model_cfg, built.state, built.batch_spec()
  with sharding.use_mesh(mesh):
    start = time.perf_counter()
    lowered = built.step.lower(state, batch)
    try:
      compiled, out_of_memory = lowered.compile(), ""
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      compiled, out_of_memory = None, str(e).strip().splitlines()[0]
    compile_s = time.perf_counter() - start

  if compiled is not None:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    temp, code, flops = mem.temp_size_in_bytes, mem.generated_code_size_in_bytes, (cost or {}).get("flops")
    bytes_accessed = (cost or {}).get("bytes accessed", float("nan"))
    collectives = roofline.collective_bytes(compiled.as_text(), len(devices))
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + temp + code
  else:  # the compiler states what the temporaries need ("... HLO temporaries (137.22G) exceeds ...")
    needed = re.search(r"temporaries \(([\d.]+)G\)", out_of_memory)
    temp, code, flops = int(float(needed.group(1)) * GIB) if needed else 0, 0, None
    total = per_device_bytes(state) + per_device_bytes(batch) + temp
    bytes_accessed, collectives = float("nan"), {}
  kind = devices[0].device_kind
  report = AotReport(
      topology=topology or "cpu", device_kind=kind, num_devices=len(devices), mesh=dict(mesh.shape),
      stage=stage.name, batch_shapes=batch.shapes(),
      params_bytes=per_device_bytes(state.params), opt_state_bytes=per_device_bytes(state.opt_state),
      batch_bytes=per_device_bytes(batch), temp_bytes=temp, code_bytes=code, total_bytes=total,
      hbm_bytes=HBM_BYTES.get(kind), flops=float("nan") if flops is None else float(flops),
      scanned_layers=model_cfg.scan_layers, compile_s=compile_s, out_of_memory=out_of_memory,
      bytes_accessed=float(bytes_accessed), collective_bytes=collectives,
      model_flops=flops_lib.train_step_flops(model_cfg, **flops_lib.stage_shapes(stage)) / len(devices),
      kernel_flops=attention_kernel_flops(model_cfg, stage, devices[0].platform) / len(devices))
  return compiled, report


def attention_kernel_flops(model_cfg, stage, platform: str) -> float:
  """FLOPs of one step (all devices) that run inside Pallas attention kernels on `platform`, analytic."""
  if attention_lib.resolve(model_cfg.attention, platform) != "splash":
    return 0.0
  from mm15_jax.kernels import splash  # Pallas TPU modules: imported where they apply, as kernels/attention.py does
  forward = flops_lib.attention_core_forward_flops(model_cfg, **flops_lib.stage_shapes(stage))
  return forward * splash.train_flops_per_forward(model_cfg.remat)


def format_report(r: AotReport) -> str:
  gib = lambda n: f"{n / GIB:8.2f} GiB" if n >= GIB else f"{n / (1 << 20):8.2f} MiB"
  fits = {True: "fits", False: "DOES NOT FIT", None: "HBM unknown for this device kind"}[r.fits]
  hbm = gib(r.hbm_bytes) if r.hbm_bytes is not None else "       ?"
  mesh = " ".join(f"{k}={v}" for k, v in r.mesh.items() if v > 1) or "1 device"
  lines = [
      f"stage {r.stage} on {r.topology}: {r.num_devices} x {r.device_kind}, mesh {mesh}",
      f"  batch: tokens {r.batch_shapes['tokens']}, images {r.batch_shapes['images']}",
      "  per device:",
      f"    parameters            {gib(r.params_bytes)}",
      f"    optimiser state       {gib(r.opt_state_bytes)}",
      f"    batch                 {gib(r.batch_bytes)}",
      f"    activations / temps   {gib(r.temp_bytes)}",
      f"    generated code        {gib(r.code_bytes)}",
      f"    total                 {gib(r.total_bytes)}  of {hbm} HBM: {fits}",
  ]
  if r.out_of_memory:
    lines += [f"  the compiler refused it: {r.out_of_memory}",
              "  (total = state + batch + the temporaries it asked for: fewer rows per chip (a larger slice or "
              "grad_accum) or more remat)"]
  else:
    lines.append(f"  FLOPs per step: {r.flops:.3e} per device, {r.flops * r.num_devices:.3e} in all")
    if r.scanned_layers:
      lines.append("    (XLA counts each scanned layer stack once: --set model.scan_layers=false for the full count)")
    lines += roofline.report_lines(device_kind=r.device_kind, flops=r.flops, hbm_bytes=r.bytes_accessed,
                                   collectives=r.collective_bytes, model_flops=r.model_flops,
                                   kernel_flops=r.kernel_flops, scanned_layers=r.scanned_layers)
  lines.append(f"  compiled in {r.compile_s:.0f} s")
  return "\n".join(lines)


def fit_candidates(exp: Experiment, index: int, knob: str, devices) -> list[str]:
  """The overrides `--fit knob` tries for stage `index`, in order: grad_accum doubling from the stage's value while
  it divides the rows each device holds; remat from the model's setting to "full"."""
  stage = exp.stages[index]
  if knob == "grad_accum":
    mesh = sharding.make_mesh(exp.mesh, devices)
    rows = stage.batch_size // math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)  # per device
    values = [g for g in (stage.grad_accum * 2 ** i for i in range(16)) if g <= rows and rows % g == 0]
    return [f"stages.{stage.name}.grad_accum={g}" for g in values]
  if knob == "remat":
    if exp.model.remat not in REMAT_ORDER:
      raise ValueError(f"config key model.remat={exp.model.remat!r}: expected one of {REMAT_ORDER}")
    return [f"model.remat={r}" for r in REMAT_ORDER[REMAT_ORDER.index(exp.model.remat):]]
  raise ValueError(f"--fit {knob!r}: expected one of {FIT_KNOBS}")


def command(exp: Experiment, stages: list[str], topology: str, num_slices: int = 1, json_path: str = "",
            overrides: tuple[str, ...] = (), fit: str = "", hlo_path: str = "", log=print) -> list[AotReport]:
  """Compiles and reports every named stage (all when `stages` is empty); each report is appended to `json_path`
  as one JSON line (with the experiment's name and the config `overrides` it was built with) when given.

  `fit` (a FIT_KNOBS name): per stage, compiles the knob's candidates in order and stops at the first that fits
  the chip's HBM, logging the override that does (or that none does). `hlo_path`: the compiled HLO text goes
  there (FILE.<stage> when several stages are compiled; the last try of a --fit search)."""
  names = [s.name for s in exp.stages]
  unknown = sorted(set(stages) - set(names))
  if unknown:
    raise SystemExit(f"--stage: unknown stage(s) {unknown}; this config has {names}")
  reports = []
  for i, stage in enumerate(exp.stages):
    if stages and stage.name not in stages:
      continue
    tries = fit_candidates(exp, i, fit, topology_devices(topology, num_slices)) if fit else [""]
    for n, extra in enumerate(tries):
      exp_here = config_lib.override(copy.deepcopy(exp), [extra]) if extra else exp
      if fit:
        log(f"--fit {fit}: stage {stage.name}, try {n + 1} of {len(tries)}: {extra}")
      compiled, report = compile_train_step(exp_here, i, topology, num_slices)
      if hlo_path and compiled is not None:
        path = hlo_path if len(stages) == 1 or len(exp.stages) == 1 else f"{hlo_path}.{stage.name}"
        paths.path(path).write_text(compiled.as_text())
        log(f"compiled HLO text of stage {stage.name}: {path}")
      log(format_report(report))
      reports.append(report)
      if json_path:
        out = paths.LineLog(json_path)
        out.write(json.dumps({"experiment": exp.name, "overrides": list(overrides) + ([extra] if extra else []),
                              **dataclasses.asdict(report), "fits": report.fits}))
        out.close()
      if fit and report.fits is None:
        raise ValueError(f"--fit needs a chip whose HBM is known ({sorted(HBM_BYTES)}); {report.device_kind} "
                         f"is not one: give a TPU --topology")
      if fit and report.fits:
        log(f"--fit {fit}: stage {stage.name} fits with --set {extra} "
            f"({report.total_bytes / GIB:.2f} of {report.hbm_bytes / GIB:.2f} GiB per chip)")
        break
    else:
      if fit:
        log(f"--fit {fit}: stage {stage.name} fits with none of {tries}: a larger slice, or another knob")
  return reports
