"""The AOT report's collective bytes (parsed from compiled HLO text) and roofline estimate; `mm15 aot --hlo` on an
expert-parallel mesh writes a program whose tokens move by all-to-all."""
import math

import pytest

from mm15_jax import cli
from mm15_jax.train import aot, roofline

# Each collective form the parser meets: operand shapes printed (CPU) or not (TPU), tuple results, the three
# replica-group notations, an asynchronous start/done pair, and lines that only mention a collective.
HLO = """
  %all-gather.1 = f32[8,16,24]{2,1,0} all-gather(f32[2,16,24]{2,1,0} %p.1), replica_groups=[2,4]<=[8], dimensions={0}
  %ar = (bf16[128]{0}, f32[4]{0}) all-reduce-start(bf16[128]{0} %a, f32[4]{0} %b), replica_groups={{0,1},{2,3}}
  %ard = (bf16[128]{0}, f32[4]{0}) all-reduce-done((bf16[128]{0}, f32[4]{0}) %ar)
  %all_to_all.7 = f32[4,64,128]{2,1,0:T(8,128)S(1)} all-to-all(%bitcast.2), replica_groups={{0,1,2,3},{4,5,6,7}}
  %ar3 = f32[128,256]{1,0:T(8,128)} all-reduce(%f.35), replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0','axis_1'}
  %rs = bf16[16,32]{1,0} reduce-scatter(bf16[64,32]{1,0} %x), replica_groups={}, dimensions={0}
  %cp = s32[10]{0} collective-permute(s32[10]{0} %y), source_target_pairs={{0,1},{1,0}}
  %gte = f32[8]{0} get-tuple-element(%all-reduce.154), index=2, metadata={op_name="shard_map/all_to_all"}
"""


def test_collective_bytes_by_kind():
  got = roofline.collective_bytes(HLO, num_devices=8)
  assert got == {
      "all-gather": 8 * 16 * 24 * 4 * 3 // 4,                      # (n - 1) operands of [2, 16, 24] f32, n = 4
      "all-reduce": (128 * 2 + 4 * 4) * 2 * 1 // 2 + 128 * 256 * 4 * 2 * 7 // 8,  # n = 2 (async), n = 8 (mesh)
      "all-to-all": 4 * 64 * 128 * 4 * 3 // 4,                     # n = 4
      "reduce-scatter": 16 * 32 * 2 * 7,                           # result is 1/8 of the operand, n = 8 ({})
      "collective-permute": 10 * 4}


def test_estimate_is_the_slowest_resource():
  chip = roofline.CHIPS["TPU v5p"]
  e = roofline.estimate(chip, flops=459e12, hbm_bytes=2765e9 * 2, collective_bytes_total=600e9 * 0.5,
                        model_flops=459e12 / 2)
  assert (e.compute_s, e.memory_s, e.collective_s) == pytest.approx((1.0, 2.0, 0.5))
  assert e.step_s == pytest.approx(2.0) and e.bound == "HBM"
  assert e.mfu == pytest.approx(0.25)  # half the peak's FLOPs in twice the compute time
  table = roofline.chip_table()
  for row in ("| v4 | 275 | 1200 | 270 |", "| v5e | 197 | 819 | 200 |", "| v5p | 459 | 2765 | 600 |",
              "| v6e | 918 | 1638 | 400 |"):
    assert row in table
  lines = "\n".join(roofline.report_lines(device_kind="TPU v5p", flops=459e12, hbm_bytes=2765e9 * 2,
                                          collectives={"all-to-all": int(300e9)}, model_flops=459e12 / 2))
  assert "ESTIMATE on v5p" in lines and "2000.0 ms per step, HBM-bound" in lines
  assert "MFU this estimate implies: 25.0%" in lines
  # FLOPs inside attention kernels (which XLA's cost analysis does not count) join the compute term
  with_kernels = "\n".join(roofline.report_lines(device_kind="TPU v5p", flops=459e12, hbm_bytes=1.0, collectives={},
                                                 model_flops=459e12, kernel_flops=459e12 * 3))
  assert "4000.0 ms per step, compute-bound" in with_kernels and "in attention kernels" in with_kernels
  assert "MFU this estimate implies: 25.0%" in with_kernels
  unknown = roofline.report_lines(device_kind="cpu", flops=1.0, hbm_bytes=1.0, collectives={}, model_flops=1.0)
  assert "no chip figures for 'cpu'" in unknown[-1]
  scanned = roofline.report_lines(device_kind="TPU v5p", flops=1.0, hbm_bytes=1.0, collectives={"all-reduce": 8},
                                  model_flops=1.0, scanned_layers=True)
  assert "counted once" in scanned[0] and "--set model.scan_layers=false" in scanned[-1]
  assert not any("ESTIMATE" in line for line in scanned)


def test_aot_hlo_of_expert_parallel_step_has_all_to_all(tmp_path):
  """`mm15 aot --hlo FILE --set mesh.expert=4` (CPU devices here): the file is the compiled program, its tokens
  travel by all-to-all, and the report counts those bytes."""
  small = ["model.decoder.vocab_size=512", "model.decoder.num_layers=2", "stages.pretrain.batch_size=8",
           "stages.pretrain.data.seq_len=64", "stages.pretrain.data.max_images=2", "mesh.expert=4"]
  exp = cli.load_experiment("tiny", [], small)
  out, logged = tmp_path / "step.hlo", []
  (r,) = aot.command(exp, ["pretrain"], "cpu", hlo_path=str(out), log=logged.append)
  hlo = out.read_text()
  assert r.mesh["expert"] == 4 and "HloModule" in hlo and " all-to-all(" in hlo
  assert r.collective_bytes["all-to-all"] > 0
  assert r.collective_bytes == roofline.collective_bytes(hlo, 8)
  assert math.isfinite(r.bytes_accessed) and r.model_flops > 0
  text = "\n".join(logged)
  assert f"compiled HLO text of stage pretrain: {out}" in text and "all-to-all " in text
