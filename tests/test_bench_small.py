"""The benchmarks in bench/ run (--quick) and measure what they claim: equal active FLOPs, finite results, saved
checkpoints that restore, one compiled step per depth. No timing is asserted (the machine is shared)."""
from fixtures import load_bench as load


def test_moe_quick(capsys):
  moe = load("moe")
  rows = moe.main(["--quick"])
  cases = {(r["tokens"], r["d_model"], r["expert_width"], r["experts"]) for r in rows}
  assert cases == set(moe.QUICK_CASES)
  for tokens, d_model, width, experts in cases:
    variants = {r["variant"]: r for r in rows if (r["tokens"], r["experts"], r["expert_width"]) == (tokens, experts,
                                                                                                       width)}
    assert {"dense", "blocked", "capacity"} <= set(variants)
    assert ("ragged" in variants) == (experts <= 8)  # the first (only) quick case with E <= 8
    # Top-2 of E experts of width f: gate, up and down of two experts per token == one dense SwiGLU of width 2f.
    expected = 2 * 3 * d_model * (moe.TOP_K * width)
    assert {r["active_matmul_flops_per_token"] for r in variants.values()} == {expected}
    assert variants["dense"]["router_flops_per_token"] == 0
    assert variants["blocked"]["router_flops_per_token"] == 2 * d_model * experts
    for r in variants.values():
      assert r["finite"], r["variant"]
      assert len(r["times_s"]) == 3 and r["median_ms"] > 0
    if "ragged" in variants:
      assert variants["ragged"]["input_grad_max_rel_diff_vs_blocked"] < 1e-5
  out = capsys.readouterr().out
  assert out.count("| 1024 |") == len(rows) and '"bench": "moe"' in out


def test_checkpoint_stall_quick(capsys):
  bench = load("checkpoint_stall")
  r = bench.main(["--quick"])
  assert (r["steps"], r["every"]) == (6, 2)
  assert len(r["save_blocking_s"]) == len(r["blocking_share_of_step"]) == 3
  assert r["checkpoint_steps"] == [4, 6]           # keep_checkpoints=2 removed step 2
  assert r["latest_step"] == r["saved_step"] == r["restored_meta_step"] == 6
  assert r["restored_equal"]
  assert len(r["orbax_s"]["background_write"]) == 3  # every save was asynchronous
  assert r["param_bytes"] > 1 << 20
  assert '"bench": "checkpoint_stall"' in capsys.readouterr().out


def test_compile_depth_quick(capsys):
  bench = load("compile_depth")
  rows = bench.main(["--quick"])
  assert [(r["layers"], r["scan_layers"]) for r in rows] == [(2, True), (2, False), (4, True), (4, False)]
  by = {(r["layers"], r["scan_layers"]): r for r in rows}
  assert by[(4, True)]["num_params"] > by[(2, True)]["num_params"] == by[(2, False)]["num_params"]
  # The unrolled program grows with depth; the scanned one holds one unit whatever the depth.
  unrolled_growth = by[(4, False)]["hlo_chars"] - by[(2, False)]["hlo_chars"]
  scanned_growth = abs(by[(4, True)]["hlo_chars"] - by[(2, True)]["hlo_chars"])
  assert unrolled_growth > 10 * max(scanned_growth, 1)
  assert all(r["compile_s"] > 0 and r["lower_s"] > 0 for r in rows)
  out = capsys.readouterr().out
  assert "| 2 |" in out and "| 4 |" in out and '"bench": "compile_depth"' in out
