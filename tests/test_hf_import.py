"""Golden numerics against Hugging Face transformers with tiny random models (float32, max abs diff <= 1e-4)."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mm15_jax.convert import hf_import  # noqa: E402
from mm15_jax.models import layers  # noqa: E402
from mm15_jax.models.decoder import Decoder  # noqa: E402
from mm15_jax.models.vit import VisionTransformer  # noqa: E402

TOL = 1e-4


def randomize(model, seed):
  """Perturbs every weight (LayerNorm gains and biases too) so that a wrong mapping cannot go unnoticed."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model.eval()


def state_dict_np(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_bicubic_matches_torch_interpolate():
  grid = np.random.RandomState(0).randn(5, 5, 3).astype(np.float32)
  x = torch.from_numpy(grid).permute(2, 0, 1)[None]
  for out_h, out_w in [(10, 10), (3, 7), (12, 12)]:
    want = torch.nn.functional.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=False)
    got = np.asarray(layers.resize_grid_bicubic(grid, out_h, out_w))
    np.testing.assert_allclose(got, want[0].permute(1, 2, 0).numpy(), atol=1e-5)


def test_clip_vision_hidden_states():
  hf_cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=16, patch_size=4,
                                         hidden_act="quick_gelu", attn_implementation="eager")
  torch.manual_seed(0)
  hf = randomize(transformers.CLIPVisionModel(hf_cfg), 1)
  vision = VisionTransformer(hf_import.vision_config_from_hf(hf_cfg), dtype="float32", rngs=nnx.Rngs(0))
  hf_import.load_clip_vision(vision, state_dict_np(hf))
  for size, interpolate in [(16, False), (28, True)]:
    pixels = np.random.RandomState(size).randn(2, 3, size, size).astype(np.float32)
    with torch.no_grad():
      want = hf(pixel_values=torch.from_numpy(pixels), output_hidden_states=True,
                interpolate_pos_encoding=interpolate).hidden_states
    feats, hidden = vision(pixels.transpose(0, 2, 3, 1), return_hidden=True)
    assert hidden.shape[0] == len(want)
    for i, w in enumerate(want):
      np.testing.assert_allclose(np.asarray(hidden[i]), w.numpy(), atol=TOL, err_msg=f"size {size} state {i}")
    np.testing.assert_allclose(np.asarray(feats), want[-1][:, 1:].numpy(), atol=TOL)


def _decoder_logits(hf, cfg):
  decoder = Decoder(cfg, dtype="float32", rngs=nnx.Rngs(0))
  hf_import.load_hf_decoder(decoder, state_dict_np(hf))
  return decoder


def _compare(hf, decoder):
  tokens = np.random.RandomState(0).randint(0, 256, (2, 12)).astype(np.int32)
  with torch.no_grad():
    want = hf(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
  seg = np.ones_like(tokens)
  pos = np.tile(np.arange(12, dtype=np.int32), (2, 1))
  got, _, _ = decoder(decoder.embed(tokens), seg, pos)
  np.testing.assert_allclose(np.asarray(got), want, atol=TOL)


COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, attn_implementation="eager",
              rope_parameters={"rope_type": "default", "rope_theta": 500.0})


@pytest.mark.parametrize("kind,extra", [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen2", {})])
def test_llama_and_qwen2_logits(kind, extra):
  cls_cfg, cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                  "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
  hf_cfg = cls_cfg(**COMMON, **extra)
  torch.manual_seed(0)
  hf = randomize(cls(hf_cfg), 2)
  cfg = hf_import.decoder_config_from_hf(hf_cfg)
  assert cfg.qkv_bias == (kind == "qwen2") and cfg.rope_theta == 500.0
  assert cfg.tie_embeddings == bool(extra.get("tie_word_embeddings", False))
  _compare(hf, _decoder_logits(hf, cfg))


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "linear", "factor": 3.0}, {"rope_type": "dynamic", "factor": 2.0}])
def test_rope_scaling_logits(rope):
  """Wavelengths of 6 to 900 positions span llama3's three bands (original length 16: bands at 4 and 16); the
  dynamic kind grows theta because the 12 positions pass max_position_embeddings 8."""
  common = dict(COMMON, rope_parameters=dict(rope, rope_theta=500.0), max_position_embeddings=8)
  hf_cfg = transformers.LlamaConfig(**common)
  torch.manual_seed(0)
  hf = randomize(transformers.LlamaForCausalLM(hf_cfg), 4)
  cfg = hf_import.decoder_config_from_hf(hf_cfg)
  assert cfg.rope_scaling.kind == rope["rope_type"] and cfg.rope_scaling.factor == rope["factor"]
  _compare(hf, _decoder_logits(hf, cfg))
  plain = dataclasses.replace(cfg, rope_scaling=None)  # the scaling matters at these positions
  with pytest.raises(AssertionError):
    _compare(hf, _decoder_logits(hf, plain))


def test_mixtral_logits_both_checkpoint_layouts():
  hf_cfg = transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
  torch.manual_seed(0)
  hf = randomize(transformers.MixtralForCausalLM(hf_cfg), 3)
  cfg = hf_import.decoder_config_from_hf(hf_cfg)
  assert cfg.moe.num_experts == 4 and cfg.moe.every == 1
  decoder = _decoder_logits(hf, cfg)
  _compare(hf, decoder)
  # On-disk layout: per-expert w1 (gate), w3 (up), w2 (down) under block_sparse_moe.
  sd = state_dict_np(hf)
  disk = {}
  for k, v in sd.items():
    if "mlp.experts.gate_up_proj" in k:
      base = k.replace("mlp.experts.gate_up_proj", "block_sparse_moe.experts.")
      for e in range(4):
        disk[f"{base}{e}.w1.weight"], disk[f"{base}{e}.w3.weight"] = v[e, :128], v[e, 128:]
    elif "mlp.experts.down_proj" in k:
      base = k.replace("mlp.experts.down_proj", "block_sparse_moe.experts.")
      for e in range(4):
        disk[f"{base}{e}.w2.weight"] = v[e]
    else:
      disk[k.replace("mlp.gate.weight", "block_sparse_moe.gate.weight")] = v
  other = Decoder(cfg, dtype="float32", rngs=nnx.Rngs(1))
  hf_import.load_hf_decoder(other, disk)
  for a, b in zip(jax.tree.leaves(nnx.state(decoder)), jax.tree.leaves(nnx.state(other))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_or_misshaped_tensor_is_named():
  hf_cfg = transformers.LlamaConfig(**COMMON)
  torch.manual_seed(0)
  sd = state_dict_np(transformers.LlamaForCausalLM(hf_cfg))
  cfg = hf_import.decoder_config_from_hf(hf_cfg)
  decoder = Decoder(cfg, dtype="float32", rngs=nnx.Rngs(0))
  broken = dict(sd)
  del broken["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
    hf_import.load_hf_decoder(decoder, broken)
  wrong = Decoder(dataclasses.replace(cfg, ffn_dim=96), dtype="float32", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="ffn.* expects shape"):
    hf_import.load_hf_decoder(wrong, sd)
