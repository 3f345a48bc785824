"""`mm15 export-hf`: the decoder as a standard HF checkpoint; transformers' logits equal the JAX model's; the exported
processor gives the inputs the project's own pipeline gives."""
import contextlib
import dataclasses
import importlib
import io
import json

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from mm15_jax import cli  # noqa: E402
from mm15_jax import config as config_lib  # noqa: E402
from mm15_jax.config import (ConnectorConfig, DataConfig, DecoderConfig, ModelConfig, MoEConfig,  # noqa: E402
                             RopeScaling, SplitConfig, StageConfig, VisionConfig)
from mm15_jax.convert import export_hf, hf_import  # noqa: E402
from mm15_jax.data import samples  # noqa: E402
from mm15_jax.data.tokenizer import Tokenizer  # noqa: E402
from mm15_jax.eval import ask, generate  # noqa: E402
from mm15_jax.eval import run as eval_run  # noqa: E402
from mm15_jax.models.decoder import Decoder  # noqa: E402
from mm15_jax.models.multimodal import MultimodalModel  # noqa: E402
from mm15_jax.train import checkpoint  # noqa: E402

from test_images import natural_image  # noqa: E402
from test_tokenizer_hf import hf_dir  # noqa: E402,F401 (fixture)

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


WHOLE_MODEL = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


@pytest.mark.parametrize("kind", list(WHOLE_MODEL))
def test_export_command_image_and_text_logits(kind, tok, tmp_path, capsys):
  """The whole model through transformers' remote code, and its decoder alone, from a checkpoint: dense, an MoE FFN
  in every layer (renormalised top-k) and every second layer (a shared expert, raw top-k, q/k/v biases)."""
  cfg = ModelConfig(vision=VisionConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64,
                                        feature_layer=-2, act="gelu"),
                    connector=ConnectorConfig(hidden=24, depth=1, pooled_side=2, center_tokens=True),
                    decoder=dataclasses.replace(CASES[kind], vocab_size=tok.vocab_size), dtype="float32")
  model = MultimodalModel(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(state))))
  nnx.update(model, jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), state))
  ckpt = str(tmp_path / "ckpt")
  checkpoint.save_params(ckpt, nnx.state(model, nnx.Param), {"model": config_lib.to_dict(cfg), "step": 0})
  out = tmp_path / "hf"
  cli.main(["export-hf", "--checkpoint", ckpt, "--tokenizer", tok.model_path, "--out", str(out)])
  assert json.loads(capsys.readouterr().out)["decoder_architecture"] == WHOLE_MODEL[kind]
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
  assert np.abs(swapped[0, 3:] - got[0, 3:]).max() > 1e-2
  # Before it, nothing changes; up to rounding in the MoE cases, whose fused expert matmuls group all the row's
  # tokens by expert, so a token's sums are blocked differently when other tokens route differently.
  np.testing.assert_allclose(swapped[0, :3], got[0, :3], rtol=0, atol=0 if kind == "llama" else 1e-5)
  # transformers' generate (KV cache, greedy) continues the prompt as the JAX model does.
  pixels = remote.preprocess_tiles(torch.from_numpy(tiles[0]))
  new = hf.generate(input_ids=torch.from_numpy(tokens).long(), pixel_values=pixels, max_new_tokens=5,
                    do_sample=False, eos_token_id=None, pad_token_id=0)[0, 20:].tolist()
  assert new == list(generate.stream_generate(model, tokens, tiles, np.ones((1, 2), bool), image_token_id=tok.image_id,
                                              stop_ids=(), max_new_tokens=5))
  with pytest.raises(SystemExit, match="already holds model.safetensors"):
    cli.main(["export-hf", "--checkpoint", ckpt, "--tokenizer", tok.model_path, "--out", str(out)])


# --- the exported processor: PIL images + a prompt -> the inputs the project's own pipeline gives ---------------------

def exported_model(tok, split: SplitConfig, out, tmp_path, seed: int = 3):
  """(model, its config, the stage, out): a random tiny model saved as the stage `split` belongs to, exported."""
  cfg = ModelConfig(vision=VisionConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64,
                                        feature_layer=-2, act="gelu"),
                    connector=ConnectorConfig(hidden=24, depth=1, pooled_side=2),
                    decoder=DecoderConfig(**dict(BASE, vocab_size=tok.vocab_size, max_len=512)), dtype="float32")
  model = MultimodalModel(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
  nnx.update(model, jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), state))
  stage = StageConfig(name="sft", image_size=16, data=DataConfig(tokenizer=tok.model_path, split=split))
  ckpt = str(tmp_path / "ckpt")
  checkpoint.save_params(ckpt, nnx.state(model, nnx.Param),
                         {"model": config_lib.to_dict(cfg), "stage": config_lib.to_dict(stage), "step": 0})
  with contextlib.redirect_stdout(io.StringIO()):
    cli.main(["export-hf", "--checkpoint", ckpt, "--tokenizer", tok.model_path, "--out", str(out)])
  return model, cfg, stage


def project_inputs(tok, stage, cfg, record: dict, n_max=None):
  """(ids, uint8 tiles) of the prompt as `mm15 generate` encodes it (samples.encode_prompt, the stage's split)."""
  spec = eval_run.eval_spec(stage.data, tile_size=stage.image_size, tokens_per_tile=cfg.tokens_per_tile, n_max=n_max)
  sample = samples.encode_prompt(record, tok, spec, n_max=n_max, where="test")
  return sample.ids, sample.tiles


def png(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, "PNG")
  return buf.getvalue()


def sample_images():
  """An RGB photo-like image whose overview shrinks 7.5x (reduced first), a small one that is enlarged, a grey one
  and one with transparency."""
  rgba = np.concatenate([natural_image(30, 50, seed=2), np.full((30, 50, 1), 255, np.uint8)], axis=-1)
  rgba[5:20, 10:30, 3] = 0
  return {"photo": Image.fromarray(natural_image(70, 120, seed=1)), "small": Image.fromarray(natural_image(40, 30)),
          "grey": Image.fromarray(natural_image(64, 20, seed=4)[..., 0]), "alpha": Image.fromarray(rgba, "RGBA")}


DYNAMIC = SplitConfig(mode="dynamic", n_min=2, n_max=6, resample="antialias")
PROCESSOR_CASES = {  # split, images, prompt or messages, n_max
    "dynamic": (DYNAMIC, ["photo"], "Where is the red box?", None),
    "static_separator_overview_first": (
        SplitConfig(mode="static", static_grid=2, overview_first=True, tile_markers="separator", resample="antialias"),
        ["small"], "Look: <image> what is it?", None),
    "three_images_unsplit": (DYNAMIC, ["alpha", "grey", "photo"], "Compare them.", None),
    "n_max_and_fast_stage": (dataclasses.replace(DYNAMIC, resample="fast"), ["photo"], "Read it.", 8),
    "conversation": (DYNAMIC, ["small"], [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "<image>\nwhat color is the box?"},
                                          {"role": "assistant", "content": "red"},
                                          {"role": "user", "content": "and the dog?"}], None),
}


def check_processor(out, tok, stage, cfg, case):
  split, names, prompt, n_max = case
  images = sample_images()
  raws = [png(images[n]) for n in names]
  processor = transformers.AutoProcessor.from_pretrained(str(out), trust_remote_code=True)
  pil = [Image.open(io.BytesIO(raw)) for raw in raws]
  if isinstance(prompt, str):
    got = processor(text=prompt, images=pil, n_max=n_max)
    record = ask.prompt_record(prompt, raws)
  else:
    got = processor(messages=prompt, images=pil, n_max=n_max)
    record = {"kind": "sft", "images": raws, "messages": prompt}
  # The processor always resizes as "antialias" does: a "fast" stage is compared with its antialiased tiles.
  reference_stage = dataclasses.replace(stage, data=dataclasses.replace(
      stage.data, split=dataclasses.replace(stage.data.split, resample="antialias")))
  ids, tiles = project_inputs(tok, reference_stage, cfg, record, n_max=n_max)
  assert got["input_ids"].dtype == torch.long and got["input_ids"][0].tolist() == ids.tolist()
  assert got["attention_mask"].tolist() == [[1] * len(ids)]
  remote = importlib.import_module(type(processor).__module__.rsplit(".", 1)[0] + ".modeling_mm15")
  # Exactly equal: the project's tolerance for "antialias" tiles is none (tests/test_images.py assert_resampled).
  assert torch.equal(got["pixel_values"], remote.preprocess_tiles(torch.from_numpy(tiles)))
  assert int((got["input_ids"] == tok.image_id).sum()) == len(tiles) * cfg.tokens_per_tile
  assert processor.decode(got["input_ids"][0]) == tok.decode(ids)
  return processor, got, ids, tiles


@pytest.mark.parametrize("case", list(PROCESSOR_CASES))
def test_processor_inputs_equal_the_projects(case, tok, tmp_path):
  split = PROCESSOR_CASES[case][0]
  out = tmp_path / "hf"
  _, cfg, stage = exported_model(tok, split, out, tmp_path)
  saved = json.loads((out / "processor_config.json").read_text())
  assert saved["split"]["mode"] == split.mode and saved["tile_size"] == 16
  assert saved["trained_resample"] == split.resample
  check_processor(out, tok, stage, cfg, PROCESSOR_CASES[case])


def test_processor_with_the_llms_tokenizer_and_template(hf_dir, tmp_path):
  kind, directory = hf_dir
  hf_tok = Tokenizer(str(directory))
  assert hf_tok.chat_template == "llm"
  out = tmp_path / "hf"
  _, cfg, stage = exported_model(hf_tok, DYNAMIC, out, tmp_path)
  for case in ("dynamic", "conversation", "three_images_unsplit"):
    _, got, ids, _ = check_processor(out, hf_tok, stage, cfg, PROCESSOR_CASES[case])
    assert (ids[0] == hf_tok.bos_id) == (kind == "llama3")  # Qwen2 prompts start without BOS


def test_processor_inputs_give_the_jax_models_logits(tok, tmp_path):
  out = tmp_path / "hf"
  model, cfg, stage = exported_model(tok, DYNAMIC, out, tmp_path)
  assert json.loads((out / "config.json").read_text())["auto_map"]["AutoProcessor"] == "processing_mm15.Mm15Processor"
  processor, inputs, ids, tiles = check_processor(out, tok, stage, cfg, PROCESSOR_CASES["dynamic"])
  assert len(tiles) > 3  # a grid of tiles and the overview
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32)
  tokens = ids[None].astype(np.int32)
  pos = np.arange(tokens.shape[1], dtype=np.int32)[None]
  want, _ = model(tokens, tiles[None], np.ones((1, len(tiles)), bool), np.ones_like(tokens), pos,
                  image_token_id=tok.image_id)
  with torch.no_grad():
    got = hf(**inputs).logits.numpy()
  np.testing.assert_allclose(got, np.asarray(want), atol=TOL)
  # As the README shows it: transformers' generate on the processor's output continues as the JAX model does.
  new = hf.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
  assert new[0, len(ids):].tolist() == list(generate.stream_generate(
      model, tokens, tiles[None], np.ones((1, len(tiles)), bool), image_token_id=tok.image_id, stop_ids=(),
      max_new_tokens=4))
  with pytest.raises(ValueError, match="2 '<image>' marks for 1 images"):
    processor(text="<image> and <image>", images=[sample_images()["small"]])
  for bad, match in (({"n_max": 17}, r"n_max=17 applies to a dynamic split, from its n_min=2 to 16"),
                     ({"n_max": 1}, r"n_max=1 applies"), ({"images": [sample_images()["small"]] * 33}, "at most 32")):
    with pytest.raises(ValueError, match=match):
      processor(**{"text": "hi", "images": [sample_images()["small"]], **bad})
