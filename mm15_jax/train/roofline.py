"""A roofline estimate of one train step on a TPU chip, from the compiled program: an estimate, not a measurement.

  step time >= max(FLOPs / peak FLOP/s,  HBM bytes / HBM bandwidth,  collective bytes / ICI bandwidth)

per chip, each term a lower bound of the time its resource needs, as if the other two overlapped perfectly with it.
FLOPs and HBM bytes are XLA's cost analysis of the compiled step ("flops", "bytes accessed"), plus the FLOPs run
inside Pallas kernels (splash attention), which the cost analysis does not see (analytic: train/aot.py); collective
bytes are what one device sends, summed over the collectives of the compiled HLO text (ring algorithms over a group
of n devices with an operand of S bytes per device):

  all-gather (n - 1) S,  reduce-scatter (n - 1) / n S,  all-reduce 2 (n - 1) / n S,  all-to-all (n - 1) / n S,
  collective-permute S.

(A collective inside a while loop, a scanned layer stack's, is counted once, as XLA's cost analysis counts it.)

The implied MFU is the model FLOPs (train/flops.py: matmuls only, no rematerialisation) over the estimated time at
the chip's peak. XLA counts a scanned layer stack's loop body once, for FLOPs, bytes and collectives alike, so the
estimate is only made for programs compiled with model.scan_layers=false (the collectives are listed either way).
"""
from __future__ import annotations

import dataclasses
import math
import re


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float       # dense bfloat16 FLOP/s
  hbm_bandwidth: float    # bytes/s
  ici_bandwidth: float    # bytes/s one chip sends: half the bidirectional per-chip ICI figure


# Google Cloud TPU documentation, per chip (v4's ICI: its all-reduce bandwidth per pod, 1.1 PB/s, over 4096 chips).
CHIPS = {
    "TPU v4": Chip("v4", 275e12, 1200e9, 270e9),
    "TPU v5 lite": Chip("v5e", 197e12, 819e9, 200e9),
    "TPU v5": Chip("v5p", 459e12, 2765e9, 600e9),
    "TPU v5p": Chip("v5p", 459e12, 2765e9, 600e9),
    "TPU v6 lite": Chip("v6e", 918e12, 1638e9, 400e9),
}
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_OP = re.compile(r"=\s*(?P<result>.*?)\s(?P<kind>" + "|".join(sorted(KINDS, key=len, reverse=True))
                 + r")(?P<phase>-start|-done)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
# Bytes a device sends, as a multiple of the collective's result R (per device) in a group of n: an all-gather's
# result is n operands, a reduce-scatter's one n-th of its operand; the others' result is their operand's size.
_SENT_PER_RESULT_BYTE = {
    "all-gather": lambda n: (n - 1) / n, "reduce-scatter": lambda n: n - 1, "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-to-all": lambda n: (n - 1) / n, "ragged-all-to-all": lambda n: (n - 1) / n, "collective-permute": lambda n: 1}


def chip_of(device_kind: str) -> Chip | None:
  return CHIPS.get(device_kind)


def _array_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _group_size(line: str, num_devices: int) -> int:
  """Devices per group from replica_groups: {{0,1},{2,3}}, the iota form [groups,size]<=[...], or the mesh form
  mesh['axis_0'=8,'axis_1'=1] {'axis_0'}; {} (or none) is every device."""
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
  if iota:
    return int(iota.group(1).split(",")[-1])
  groups = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if groups:
    return len(groups.group(1).split(","))
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if mesh:
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
    return math.prod(sizes[a] for a in re.findall(r"'([^']+)'", mesh.group(2)))
  return num_devices


def collective_bytes(hlo_text: str, num_devices: int) -> dict[str, int]:
  """Bytes one device sends per step, by collective kind, over the instructions of compiled HLO text. Sizes come
  from each collective's result (compiled TPU HLO does not print operand shapes); an asynchronous collective is
  counted at its "-done" half, whose result is the collective's."""
  out = dict.fromkeys(KINDS, 0)
  started = {}  # an asynchronous collective's "-start" name -> its group size (its "-done" line has no groups)
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    if m.group("phase") == "-start":
      started[line.split("=", 1)[0].strip().removeprefix("ROOT ").strip()] = _group_size(line, num_devices)
      continue
    if m.group("phase") == "-done":
      operand = re.search(r"(%[\w.-]+)\)", line[m.end():])
      n = started.get(operand.group(1) if operand else "", num_devices)
    else:
      n = _group_size(line, num_devices)
    kind = m.group("kind")
    out[kind] += int(_array_bytes(m.group("result")) * _SENT_PER_RESULT_BYTE[kind](n))
  return {k: v for k, v in out.items() if v}


@dataclasses.dataclass(frozen=True)
class Estimate:
  compute_s: float
  memory_s: float
  collective_s: float
  mfu: float              # model FLOPs / (step_s * peak)

  @property
  def step_s(self) -> float:
    return max(self.compute_s, self.memory_s, self.collective_s)

  @property
  def bound(self) -> str:
    return max((self.compute_s, "compute"), (self.memory_s, "HBM"), (self.collective_s, "ICI"))[1]


def estimate(chip: Chip, *, flops: float, hbm_bytes: float, collective_bytes_total: float,
             model_flops: float) -> Estimate:
  """Per-device figures of one step -> the roofline estimate on `chip`."""
  e = Estimate(flops / chip.peak_flops, hbm_bytes / chip.hbm_bandwidth, collective_bytes_total / chip.ici_bandwidth,
               0.0)
  return dataclasses.replace(e, mfu=model_flops / (e.step_s * chip.peak_flops) if e.step_s > 0 else float("nan"))


def chip_table() -> str:
  """The per-chip figures the estimate uses, one row per TPU kind (markdown)."""
  rows = ["| chip | peak bf16 TFLOP/s | HBM GB/s | ICI GB/s sent per chip |", "|---|---|---|---|"]
  for chip in {c.name: c for c in CHIPS.values()}.values():
    rows.append(f"| {chip.name} | {chip.peak_flops / 1e12:.0f} | {chip.hbm_bandwidth / 1e9:.0f} | "
                f"{chip.ici_bandwidth / 1e9:.0f} |")
  return "\n".join(rows)


def report_lines(*, device_kind: str, flops: float, hbm_bytes: float, collectives: dict[str, int],
                 model_flops: float, kernel_flops: float = 0.0, scanned_layers: bool = False) -> list[str]:
  """The AOT report's collective and roofline lines. `kernel_flops`: FLOPs run inside Pallas kernels, which XLA's
  cost analysis (`flops`) does not count; the compute term adds them."""
  mib = lambda n: f"{n / (1 << 20):.1f} MiB"
  moved = ", ".join(f"{k} {mib(v)}" for k, v in collectives.items()) or "none"
  once = " (a scanned layer stack's counted once)" if scanned_layers else ""
  lines = [f"  collectives per step, bytes sent per device{once}: {moved}"]
  if scanned_layers:
    return lines + ["  roofline estimate: not made for scanned layers (XLA counts the stack's body once): "
                    "--set model.scan_layers=false"]
  chip = chip_of(device_kind)
  if chip is None or not (math.isfinite(flops) and math.isfinite(hbm_bytes)):
    return lines + [f"  roofline estimate: no chip figures for {device_kind!r} (TPU kinds: "
                    f"{sorted({c.name for c in CHIPS.values()})})"]
  compute_flops, sent = flops + kernel_flops, sum(collectives.values())
  e = estimate(chip, flops=compute_flops, hbm_bytes=hbm_bytes, collective_bytes_total=sent, model_flops=model_flops)
  return lines + [
      f"  roofline ESTIMATE on {chip.name} (max of compute, HBM, ICI time; not a measurement): "
      f"{e.step_s * 1e3:.1f} ms per step, {e.bound}-bound",
      f"    compute {e.compute_s * 1e3:.1f} ms = {compute_flops:.3e} FLOPs"
      + (f" ({flops:.3e} XLA + {kernel_flops:.3e} in attention kernels, analytic)" if kernel_flops else "")
      + f" / {chip.peak_flops:.3g} FLOP/s; "
      f"HBM {e.memory_s * 1e3:.1f} ms = {hbm_bytes:.3e} B / {chip.hbm_bandwidth:.3g} B/s; "
      f"ICI {e.collective_s * 1e3:.1f} ms = {sent:.3e} B / {chip.ici_bandwidth:.3g} B/s",
      f"    MFU this estimate implies: {100 * e.mfu:.1f}% ({model_flops:.3e} model FLOPs per device per step)",
  ]
