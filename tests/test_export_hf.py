"""`mm15 export-hf`: the decoder as a standard HF checkpoint; transformers' logits equal the JAX model's."""
import dataclasses
import importlib
import json

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import save_file  # noqa: E402

from mm15_jax import cli  # noqa: E402
from mm15_jax import config as config_lib  # noqa: E402
from mm15_jax.config import (ConnectorConfig, DecoderConfig, ModelConfig, MoEConfig, RopeScaling,  # noqa: E402
                             VisionConfig)
from mm15_jax.convert import export_hf, hf_import  # noqa: E402
from mm15_jax.eval import generate  # noqa: E402
from mm15_jax.models.decoder import Decoder  # noqa: E402
from mm15_jax.models.multimodal import MultimodalModel  # noqa: E402
from mm15_jax.train import checkpoint  # noqa: E402

TOL = 1e-4
BASE = dict(vocab_size=384, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=96, rope_theta=500.0,
            max_len=64)
CASES = {
    "llama": DecoderConfig(**BASE, rope_scaling=RopeScaling(kind="llama3", factor=4.0, original_max_len=16)),
    "qwen2": DecoderConfig(**BASE, qkv_bias=True, tie_embeddings=True),
    "mixtral": DecoderConfig(**BASE, moe=MoEConfig(num_experts=4, top_k=2, every=1, ffn_dim=48)),
    "qwen2_moe": DecoderConfig(**BASE, qkv_bias=True, moe=MoEConfig(num_experts=4, top_k=2, every=2, ffn_dim=48,
                                                                    norm_topk=False, shared_expert_dim=80)),
}


def random_decoder(cfg: DecoderConfig, seed: int) -> Decoder:
  """Every parameter perturbed: norms and biases are not at their initial ones and zeros."""
  decoder = Decoder(cfg, dtype="float32", rngs=nnx.Rngs(seed))
  state = nnx.state(decoder, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
  nnx.update(decoder, jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), state))
  return decoder


def write(cfg: DecoderConfig, decoder: Decoder, directory) -> None:
  tensors = export_hf.decoder_tensors(cfg, nnx.to_pure_dict(nnx.state(decoder, nnx.Param)))
  config = export_hf.hf_config(cfg)
  config.save_pretrained(str(directory))
  save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def compare(decoder: Decoder, directory, vocab: int = 384) -> None:
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                         attn_implementation="eager")
  tokens = np.random.RandomState(0).randint(0, vocab, (2, 24)).astype(np.int32)  # past llama3's original 16
  with torch.no_grad():
    want = hf(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
  pos = np.tile(np.arange(24, dtype=np.int32), (2, 1))
  got, _, _ = decoder(decoder.embed(tokens), np.ones_like(tokens), pos)
  np.testing.assert_allclose(np.asarray(got), want, atol=TOL)


@pytest.mark.parametrize("kind", list(CASES))
def test_exported_decoder_logits_and_round_trip(kind, tmp_path):
  cfg = CASES[kind]
  assert export_hf.architecture(cfg) == kind
  decoder = random_decoder(cfg, 1)
  write(cfg, decoder, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["model_type"] == kind
  compare(decoder, tmp_path)
  # Importing the export gives back exactly the parameters.
  again = Decoder(hf_import.decoder_config_from_hf(transformers.AutoConfig.from_pretrained(str(tmp_path))),
                  dtype="float32", rngs=nnx.Rngs(5))
  hf_import.load_hf_decoder(again, hf_import.read_safetensors(str(tmp_path)))
  for a, b in zip(jax.tree.leaves(nnx.state(decoder, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_command_image_and_text_logits(tok, tmp_path, capsys):
  """The whole model through transformers' remote code, and its decoder alone, from a checkpoint."""
  cfg = ModelConfig(vision=VisionConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64,
                                        feature_layer=-2, act="gelu"),
                    connector=ConnectorConfig(hidden=24, depth=1, pooled_side=2),
                    decoder=dataclasses.replace(CASES["llama"], vocab_size=tok.vocab_size), dtype="float32")
  model = MultimodalModel(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(state))))
  nnx.update(model, jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), state))
  ckpt = str(tmp_path / "ckpt")
  checkpoint.save_params(ckpt, nnx.state(model, nnx.Param), {"model": config_lib.to_dict(cfg), "step": 0})
  out = tmp_path / "hf"
  cli.main(["export-hf", "--checkpoint", ckpt, "--tokenizer", tok.model_path, "--out", str(out)])
  assert json.loads(capsys.readouterr().out)["decoder_architecture"] == "LlamaForCausalLM"
  compare(model.decoder, out / "decoder", vocab=tok.vocab_size)

  hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32)
  rng = np.random.RandomState(1)
  tokens = rng.randint(0, tok.base_vocab_size, (1, 20)).astype(np.int32)
  tokens[0, 3:7] = tokens[0, 10:14] = tok.image_id  # two tiles of 4 tokens
  tiles = rng.randint(0, 256, (1, 2, 16, 16, 3)).astype(np.uint8)
  pos = np.arange(20, dtype=np.int32)[None]
  want, _ = model(tokens, tiles, np.ones((1, 2), bool), np.ones_like(tokens), pos, image_token_id=tok.image_id)
  remote = importlib.import_module(type(hf).__module__)
  with torch.no_grad():
    got = hf(input_ids=torch.from_numpy(tokens).long(),
             pixel_values=remote.preprocess_tiles(torch.from_numpy(tiles[0]))).logits.numpy()
  np.testing.assert_allclose(got, np.asarray(want), atol=TOL)
  with torch.no_grad():  # the tiles matter: swapped, the logits after the first placeholder change
    swapped = hf(input_ids=torch.from_numpy(tokens).long(),
                 pixel_values=remote.preprocess_tiles(torch.from_numpy(tiles[0, ::-1].copy()))).logits.numpy()
  assert np.abs(swapped[0, 3:] - got[0, 3:]).max() > 1e-2 and np.array_equal(swapped[0, :3], got[0, :3])
  # transformers' generate (KV cache, greedy) continues the prompt as the JAX model does.
  pixels = remote.preprocess_tiles(torch.from_numpy(tiles[0]))
  new = hf.generate(input_ids=torch.from_numpy(tokens).long(), pixel_values=pixels, max_new_tokens=5,
                    do_sample=False, eos_token_id=None, pad_token_id=0)[0, 20:].tolist()
  assert new == list(generate.stream_generate(model, tokens, tiles, np.ones((1, 2), bool), image_token_id=tok.image_id,
                                              stop_ids=(), max_new_tokens=5))
  with pytest.raises(SystemExit, match="already holds model.safetensors"):
    cli.main(["export-hf", "--checkpoint", ckpt, "--tokenizer", tok.model_path, "--out", str(out)])
