"""How long an asynchronous checkpoint save blocks the training loop, as a share of one train step.

    python bench/checkpoint_stall.py            # ~200 MB of parameters (an MoE FFN of 32 experts), 3 saves
    python bench/checkpoint_stall.py --quick    # a few MB (a smoke run)

The loop is runner.run_stage's: a jitted, state-donating train step over a grain iterator and
`train.checkpoint.Checkpointer.save(step, state, data_iter, meta)` every `--every` steps, `close()` at the end.
Before each save the step's results are waited for, so the save's time is the checkpoint's own: what the loop
cannot do while `save` runs (device-to-host copies, waiting for the previous save to finish, directory work).
The background write shares the CPU with the next steps; their time is reported apart ("steps during a save").
At the end the newest checkpoint is restored and compared with a host copy of the state it saved.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import grain  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mm15_jax import machine  # noqa: E402
from mm15_jax import config as config_lib  # noqa: E402
from mm15_jax import sharding  # noqa: E402
from mm15_jax.config import (ConnectorConfig, DataConfig, DecoderConfig, Experiment, MeshConfig,  # noqa: E402
                             ModelConfig, MoEConfig, SplitConfig, StageConfig, VisionConfig)
from mm15_jax.data.batch import Batch  # noqa: E402
from mm15_jax.train import checkpoint as ckpt_lib  # noqa: E402
from mm15_jax.train import stage as stage_lib  # noqa: E402

IMAGE_TOKEN_ID = 3
TILE, POOLED_SIDE = 16, 2


def model_config(quick: bool) -> ModelConfig:
  """The recipe's structure; the MoE FFN's experts hold most of the parameters (little compute per token)."""
  d, experts, expert_ffn = (64, 8, 128) if quick else (512, 32, 1024)
  return ModelConfig(
      vision=VisionConfig(image_size=TILE, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64, pre_norm=False),
      connector=ConnectorConfig(hidden=32, depth=1, pooled_side=POOLED_SIDE, se_ratio=0.0),
      decoder=DecoderConfig(vocab_size=1024 if quick else 8192, d_model=d, num_layers=2, num_heads=4, num_kv_heads=2,
                            ffn_dim=2 * d, max_len=256,
                            moe=MoEConfig(num_experts=experts, top_k=2, every=2, ffn_dim=expert_ffn)),
      dtype="float32", param_dtype="float32", remat="none", scan_layers=True)


def batch_at(index: int, *, batch: int, seq_len: int, vocab: int) -> Batch:
  """A batch obeying the trainer's contract (one segment per row, one image tile per row), seeded by its index."""
  rng = np.random.default_rng(index)
  tokens = rng.integers(IMAGE_TOKEN_ID + 1, vocab, (batch, seq_len + 1)).astype(np.int32)
  tokens[:, 1:1 + POOLED_SIDE ** 2] = IMAGE_TOKEN_ID
  return Batch(tokens=tokens[:, :-1], targets=tokens[:, 1:],
               loss_mask=(tokens[:, 1:] != IMAGE_TOKEN_ID).astype(np.float32),
               segment_ids=np.ones((batch, seq_len), np.int32),
               positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
               images=rng.integers(0, 256, (batch, 1, TILE, TILE, 3), dtype=np.uint8),
               image_mask=np.ones((batch, 1), bool), source_ids=np.zeros((batch, seq_len), np.int32))


# Orbax reports its phases through jax.monitoring: what the caller waits for, and the background write.
ORBAX_EVENTS = {"blocking": "/jax/orbax/write/async/blocking_duration_secs",
                "wait_for_previous_save": "/jax/orbax/write/blocking_wait_prev_duration_secs",
                "device_to_host": "/jax/orbax/write/blocking_d2h_duration_secs",  # one per array item
                "background_write": "/jax/orbax/write/async/total_duration_secs"}


@contextlib.contextmanager
def orbax_events():
  """{event name: [seconds, ...]} of the Orbax write events recorded inside the block."""
  events = collections.defaultdict(list)

  def listener(event: str, duration_secs: float, **_):
    events[event].append(duration_secs)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def run(directory: str, *, quick: bool, steps: int, every: int, batch: int, seq_len: int) -> dict:
  model_cfg = model_config(quick)
  data = DataConfig(mixture={"bench": 1.0}, seq_len=seq_len, max_images=1, split=SplitConfig(enlarge_on_device=False))
  stage = StageConfig(steps=steps, batch_size=batch, learning_rate=1e-4, warmup_fraction=0.0, image_size=TILE,
                      checkpoint_every=every, keep_checkpoints=2, data=data)
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  exp = Experiment(name="bench", model=model_cfg, stages=[stage], mesh=MeshConfig(data=1))
  built = stage_lib.build_stage(exp, 0, mesh, vocab_size=model_cfg.decoder.vocab_size, image_token_id=IMAGE_TOKEN_ID,
                                init="random")
  state, jit_step = built.state, built.step
  vocab = model_cfg.decoder.vocab_size
  data_iter = iter(grain.MapDataset.range(1 << 30).map(
      lambda i: batch_at(i, batch=batch, seq_len=seq_len, vocab=vocab)).to_iter_dataset())
  checkpointer = ckpt_lib.Checkpointer(directory, keep=stage.keep_checkpoints)
  meta = {"model": config_lib.to_dict(model_cfg), "stage": config_lib.to_dict(stage), "experiment": "bench"}

  step_s, save_s, after_save, saved_host, saved_step = [], [], [], None, None
  compile_start = time.perf_counter()
  with sharding.use_mesh(mesh), orbax_events() as events:
    for step in range(1, steps + 1):
      start = time.perf_counter()
      state, metrics = jit_step(state, sharding.global_batch(next(data_iter), mesh))
      jax.block_until_ready((state, metrics))
      elapsed = time.perf_counter() - start
      if step == 1:
        compile_s = time.perf_counter() - compile_start  # compile + first step
      elif (step - 1) % every == 0:
        after_save.append(elapsed)  # the first step after a save: shares the CPU with the background write
      else:
        step_s.append(elapsed)
      if step % every == 0:
        if step + every > steps:  # the last save: keep a host copy to compare the restore with
          saved_host, saved_step = jax.device_get(state), step
        start = time.perf_counter()
        checkpointer.save(step, state, data_iter, {**meta, "step": step})
        save_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    checkpointer.close()
    close_s = time.perf_counter() - start

  param_bytes, opt_bytes = nbytes(state.params), nbytes(state.opt_state)
  reader = ckpt_lib.Checkpointer(directory, keep=stage.keep_checkpoints)
  latest = reader.latest_step()
  zeros = jax.tree.map(jnp.zeros_like, state)  # restored values cannot come from the target
  restored, restored_meta = reader.restore(latest, zeros, None)
  reader.close()
  equal = all(np.array_equal(np.asarray(a), np.asarray(b))
              for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(saved_host)))
  step_med = float(np.median(step_s)) if step_s else float("nan")
  return {"param_bytes": param_bytes, "opt_state_bytes": opt_bytes,
          "batch": [batch, seq_len], "steps": steps, "every": every, "compile_and_first_step_s": round(compile_s, 3),
          "step_s_median": round(step_med, 4), "step_s": [round(s, 4) for s in step_s],
          "steps_during_save_s": [round(s, 4) for s in after_save],
          "save_blocking_s": [round(s, 4) for s in save_s], "close_wait_s": round(close_s, 4),
          "orbax_s": {k: [round(s, 4) for s in events.get(v, [])] for k, v in ORBAX_EVENTS.items()},
          "blocking_share_of_step": [round(s / step_med, 4) for s in save_s],
          "checkpoint_steps": sorted(int(d) for d in os.listdir(directory) if d.isdigit()),
          "latest_step": latest, "saved_step": saved_step, "restored_meta_step": restored_meta["step"],
          "restored_equal": bool(equal)}


def table(r: dict) -> str:
  mb = lambda n: f"{n / 2 ** 20:.1f} MB"
  during = f"{1e3 * np.median(r['steps_during_save_s']):.0f} ms" if r["steps_during_save_s"] else "-"
  ms = lambda xs: ", ".join(f"{1e3 * s:.0f}" for s in xs) or "-"
  orbax = r["orbax_s"]
  lines = ["| params + opt state | train step | step during a save | save call blocks (ms, each save) | "
           "share of a step | of which: wait for previous save (ms) | device-to-host copies (ms) | background "
           "write (ms) | close() waits |", "|---|---|---|---|---|---|---|---|---|",
           f"| {mb(r['param_bytes'])} + {mb(r['opt_state_bytes'])} | {1e3 * r['step_s_median']:.0f} ms | {during} | "
           f"{ms(r['save_blocking_s'])} | {', '.join(f'{100 * s:.1f}%' for s in r['blocking_share_of_step'])} | "
           f"{ms(orbax['wait_for_previous_save'])} | {ms(orbax['device_to_host'])} | {ms(orbax['background_write'])} "
           f"| {1e3 * r['close_wait_s']:.0f} ms |"]
  return "\n".join(lines)


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--steps", type=int, default=0, help="train steps (default 10, 6 with --quick)")
  p.add_argument("--every", type=int, default=0, help="save every N steps (default 3, 2 with --quick)")
  p.add_argument("--dir", default="", help="checkpoint directory (default: a temporary one, removed)")
  a = p.parse_args(argv)
  steps, every = a.steps or (6 if a.quick else 10), a.every or (2 if a.quick else 3)
  directory = a.dir or tempfile.mkdtemp(prefix="ckpt_stall_")
  try:
    result = run(os.path.join(directory, "checkpoints"), quick=a.quick, steps=steps, every=every,
                 batch=2 if a.quick else 4, seq_len=64 if a.quick else 256)
  finally:
    if not a.dir:
      shutil.rmtree(directory, ignore_errors=True)
  print(table(result))
  print("Measured on a shared machine under load; the share is per save, relative to the median step.")
  print(json.dumps({"bench": "checkpoint_stall", **machine.describe(" ".join(["python", "bench/checkpoint_stall.py", *argv])), **result}))
  return result


if __name__ == "__main__":
  main()
