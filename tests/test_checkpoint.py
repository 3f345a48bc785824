"""Checkpoints: bit-exact round trips, restore onto another mesh, incomplete saves, metadata."""
import dataclasses
import os

import jax
import numpy as np
import pytest

from fixtures import compilation_cache, flat, mesh_of, tiny_model  # noqa: F401 (fixture)
from mm15_jax import config as config_lib
from mm15_jax import sharding
from mm15_jax.config import MeshConfig, ModelConfig, StageConfig
from mm15_jax.train import checkpoint as ckpt_lib
from mm15_jax.train import optim
from mm15_jax.train import state as state_lib
from mm15_jax.train.step import TrainState

MODEL = tiny_model()
STAGE = StageConfig(steps=10, trainable=r"^(?!vision/patch_kernel$)")  # a frozen part: holes in the AdaFactor state


def random_state(mesh, seed: int) -> TrainState:
  """A TrainState of the tiny model on `mesh` with every array random (no init compile; every bit matters)."""
  rng = np.random.default_rng(seed)
  _, params, _ = state_lib.abstract_model(MODEL)
  shardings = sharding.param_shardings(params, mesh)
  params = jax.tree.map(lambda x, s: jax.device_put(rng.normal(size=x.shape).astype(x.dtype), s), params, shardings)
  tx = optim.make_optimizer(STAGE, params)
  state = state_lib.new_train_state(params, tx, mesh)

  def randomise(x):
    value = rng.integers(1, 100, x.shape) if x.dtype.kind == "i" else rng.random(x.shape)
    return jax.device_put(value.astype(x.dtype), x.sharding)

  return jax.tree.map(randomise, state)


def host(state: TrainState) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.device_get(jax.tree.leaves(state))]


def assert_same_values(a: TrainState, b: TrainState):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(host(a), host(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def mesh8():
  return mesh_of(MeshConfig(data=8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, mesh8):
  """A checkpoint at steps 1 and 2 (different states), saved from a data=8 mesh."""
  directory = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
  states = {1: random_state(mesh8, 1), 2: random_state(mesh8, 2)}
  ckpt = ckpt_lib.Checkpointer(directory, keep=3)
  for step, state in states.items():
    ckpt.save(step, state, None, {"model": config_lib.to_dict(MODEL), "step": step})
  ckpt.close()
  return directory, states


def test_round_trip_is_bit_identical(saved, mesh8):
  directory, states = saved
  assert sorted(int(d) for d in os.listdir(directory) if d.isdigit()) == [1, 2]
  ckpt = ckpt_lib.Checkpointer(directory, keep=3)
  assert ckpt.latest_step() == 2
  for step in (1, 2):
    like = random_state(mesh8, 99)
    restored, meta = ckpt.restore(step, like, None)
    assert meta["step"] == step
    assert_same_values(restored, states[step])
    assert int(restored.step) == int(states[step].step)
    assert state_lib.state_shardings(restored) == state_lib.state_shardings(states[step])
  ckpt.close()


def test_restore_onto_another_mesh(saved):
  directory, states = saved
  mesh222 = mesh_of(MeshConfig(data=2, fsdp=2, tensor=2))
  like = random_state(mesh222, 99)
  ckpt = ckpt_lib.Checkpointer(directory, keep=3)
  restored, _ = ckpt.restore(2, like, None)
  ckpt.close()
  assert_same_values(restored, states[2])
  want = state_lib.state_shardings(like)
  assert state_lib.state_shardings(restored) == want
  specs = {s.spec for s in jax.tree.leaves(want)}
  assert any("tensor" in str(s) for s in specs) and any("fsdp" in str(s) for s in specs)
  for x in jax.tree.leaves(restored):  # every device holds exactly its shard
    for shard in x.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(x)[shard.index])


def test_restore_model_params_reads_the_model_config(saved):
  directory, states = saved
  mesh222 = mesh_of(MeshConfig(data=2, fsdp=2, tensor=2))
  model_cfg, _, params, _ = state_lib.restore_model_params(directory, mesh222)
  assert model_cfg == MODEL
  want, got = flat(states[2].params), flat(params)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert all(x.sharding.mesh == mesh222 for x in jax.tree.leaves(params))


def test_latest_step_ignores_incomplete_save(saved, tmp_path):
  directory, _ = saved
  # What a process killed while saving step 3 leaves behind: orbax's temporary directory, never renamed.
  partial = os.path.join(directory, "3" + ckpt_lib.ocp.path.step.TMP_DIR_SUFFIX + "-1234567")
  os.makedirs(os.path.join(partial, "params"))
  with open(os.path.join(partial, "params", "_METADATA"), "w") as f:
    f.write("{")  # truncated
  try:
    ckpt = ckpt_lib.Checkpointer(directory, keep=3)
    assert ckpt.latest_step() == 2
    ckpt.close()
    assert ckpt_lib.read_meta(directory)["step"] == 2
  finally:
    import shutil
    shutil.rmtree(partial, ignore_errors=True)
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    ckpt_lib.read_meta(str(tmp_path))


def test_read_meta(saved):
  directory, _ = saved
  meta = ckpt_lib.read_meta(directory)
  assert meta["step"] == 2
  assert config_lib.from_dict(ModelConfig, meta["model"]) == MODEL
  assert ckpt_lib.read_meta(directory, step=1)["step"] == 1


def test_keeps_the_last_checkpoints(tmp_path, mesh8):
  state = random_state(mesh8, 5)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, state, None, {"step": step})
  ckpt.close()
  assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [2, 3]


def test_keeps_every_mth_checkpoint_beside_the_last(tmp_path, mesh8):
  state = random_state(mesh8, 5)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2, keep_period=3)
  for step in range(1, 8):
    ckpt.save(step, state, None, {"step": step})
  ckpt.close()
  assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [3, 6, 7]


def test_check_shapes_names_the_mismatched_parameter():
  _, want, _ = state_lib.abstract_model(MODEL)
  _, other, _ = state_lib.abstract_model(dataclasses.replace(
      MODEL, decoder=dataclasses.replace(MODEL.decoder, vocab_size=MODEL.decoder.vocab_size + 128)))
  state_lib.check_shapes(want, want, "same")
  with pytest.raises(ValueError, match=r"stages.ocr.init_from.*decoder/embedding has shape"):
    state_lib.check_shapes(want, other, "config key stages.ocr.init_from")
