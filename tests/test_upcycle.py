"""init_from a dense checkpoint of this project into an MoE model: experts copy the dense FFNs, routers are fresh,
and the upcycled model's logits equal the dense model's at step 0."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from fixtures import mesh_of, synthetic_batch, tiny_model
from mm15_jax import config as config_lib
from mm15_jax import sharding
from mm15_jax.config import Experiment, MeshConfig, MoEConfig, StageConfig
from mm15_jax.train import checkpoint as ckpt_lib
from mm15_jax.train import runner
from mm15_jax.train import state as state_lib


def _configs():
  dense = tiny_model(moe=False)
  dense = dataclasses.replace(dense, decoder=dataclasses.replace(dense.decoder, num_layers=4))
  moe = dataclasses.replace(dense, decoder=dataclasses.replace(
      dense.decoder, moe=MoEConfig(num_experts=4, top_k=2, every=2)))
  return dense, moe


def _dense_checkpoint(cfg, mesh, directory):
  """A dense model with every parameter (norm gains included) perturbed, saved as a checkpoint of this project."""
  graphdef, params, rest = state_lib.init_params(cfg, mesh, 0)
  rng = np.random.default_rng(0)
  for _, var in nnx.to_flat_state(params):
    value = np.asarray(var.get_value())
    var.set_value(jax.device_put(value + 0.1 * rng.standard_normal(value.shape).astype(value.dtype),
                                 var.get_value().sharding))
  ckpt_lib.save_params(directory, params, {"model": config_lib.to_dict(cfg), "step": 0})
  return graphdef, params, rest


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
  """(mesh, checkpoint directory, graphdef, params, rest) of the dense model."""
  mesh = mesh_of(MeshConfig(data=-1, expert=2))
  directory = str(tmp_path_factory.mktemp("dense") / "ckpt")
  return (mesh, directory, *_dense_checkpoint(_configs()[0], mesh, directory))


def test_upcycled_logits_equal_the_dense_model(dense, tmp_path):
  _, moe_cfg = _configs()
  mesh, dense_dir, dense_graphdef, dense_params, dense_rest = dense
  exp = Experiment(model=moe_cfg, stages=[StageConfig(name="sft", image_size=16, init_from=dense_dir)])
  log = []
  graphdef, params, rest = runner.initial_params(exp, 0, str(tmp_path), moe_cfg, mesh, log.append)
  assert any("upcycling the dense decoder: 4 experts" in line for line in log)

  dense_flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(dense_params)}
  up_flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
  blocks = ("decoder", "units", "blocks")
  for ffn in ("gate", "up", "down"):  # MoE block 1 of unit u: dense layer 2u + 1, one copy per expert
    dense_w = dense_flat[blocks + (0, "ffn", ffn)]
    got = up_flat[blocks + (1, "ffn", ffn)]
    assert got.shape == (2, 4) + dense_w.shape[1:]
    for e in range(4):
      np.testing.assert_array_equal(got[:, e], dense_w[1::2])
    np.testing.assert_array_equal(up_flat[blocks + (0, "ffn", ffn)], dense_w[0::2])  # dense block 0: layer 2u
  np.testing.assert_array_equal(up_flat[blocks + (1, "attn", "q")], dense_flat[blocks + (0, "attn", "q")][1::2])
  assert np.abs(up_flat[blocks + (1, "ffn", "router")]).sum() > 0  # initialised, not copied (no dense router)
  for path in dense_flat:
    if path[:3] != blocks:
      np.testing.assert_array_equal(up_flat[path], dense_flat[path], err_msg=str(path))

  batch = synthetic_batch(0, batch=8, seq_len=64, max_images=2)
  inputs = [getattr(batch, k) for k in ("tokens", "images", "image_mask", "segment_ids", "positions")]
  with sharding.use_mesh(mesh):
    want, _ = nnx.merge(dense_graphdef, dense_params, dense_rest)(*inputs, image_token_id=3)
    got, aux = nnx.merge(graphdef, params, rest)(*inputs, image_token_id=3)
  # Each MoE layer sums its k experts' (identical) outputs with weights renormalised to 1: the dense FFN.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
  assert float(np.asarray(aux["moe_load_balance_loss"])) > 0  # the routers are live


def test_upcycling_refuses_a_different_decoder(dense, tmp_path):
  _, moe_cfg = _configs()
  mesh, dense_dir = dense[:2]
  wider = dataclasses.replace(moe_cfg, decoder=dataclasses.replace(
      moe_cfg.decoder, moe=MoEConfig(num_experts=4, top_k=2, every=2, ffn_dim=128)))
  exp = Experiment(model=wider, stages=[StageConfig(name="sft", image_size=16, init_from=dense_dir)])
  with pytest.raises(ValueError, match=r"stages.sft.init_from=.*copy the dense FFN \(ffn_dim 64\)"):
    runner.initial_params(exp, 0, str(tmp_path), wider, mesh, lambda _: None)
  odd = dataclasses.replace(moe_cfg, decoder=dataclasses.replace(
      moe_cfg.decoder, moe=MoEConfig(num_experts=4, top_k=2, every=3)))
  exp = Experiment(model=odd, stages=[StageConfig(name="sft", image_size=16, init_from=dense_dir)])
  with pytest.raises(ValueError, match=r"moe.every=3 does not divide the 4 layers"):
    runner.initial_params(exp, 0, str(tmp_path), odd, mesh, lambda _: None)
