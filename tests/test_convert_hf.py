"""`mm15 convert-hf` end to end: tiny random HF models saved as safetensors -> checkpoint -> restore -> numerics
against transformers (float32, max abs diff <= 1e-4), sharded == unsharded, named errors, upcycling."""
import copy
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from mm15_jax import cli, sharding  # noqa: E402
from mm15_jax.config import (ConnectorConfig, DecoderConfig, Experiment, MeshConfig, ModelConfig, StageConfig,  # noqa: E402
                             VisionConfig, from_dict)
from mm15_jax.convert import convert_hf, hf_import, open_clip  # noqa: E402
from mm15_jax.train import checkpoint, runner  # noqa: E402
from mm15_jax.train import state as state_lib  # noqa: E402

from fixtures import compilation_cache  # noqa: E402,F401 (fixture)
from test_hf_import import randomize  # noqa: E402

TOL = 1e-4
CONNECTOR = ConnectorConfig(hidden=16, depth=1, pooled_side=2)
DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
              patch_size=4, hidden_act="quick_gelu")


def save(model, directory, **kw):
  model.save_pretrained(str(directory), **kw)
  return str(directory)


def mesh_of(n, **axes):
  return sharding.make_mesh(MeshConfig(data=1, **axes), devices=jax.devices()[:n])


def restore(out_dir, mesh=None):
  """(config, float32 MultimodalModel) from a converted checkpoint, the way a stage's init_from reads it."""
  meta = checkpoint.read_meta(out_dir)
  cfg = dataclasses.replace(from_dict(ModelConfig, meta["model"]), dtype="float32")
  graphdef, like, rest = state_lib.abstract_model(cfg)
  shardings = sharding.param_shardings(like, mesh or mesh_of(1))
  like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings)
  nnx.replace_by_pure_dict(like, checkpoint.restore_params(out_dir, like))
  rest = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), rest)
  return cfg, nnx.merge(graphdef, like, rest)


def flat_params(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def compare_vision(hf_vision, model):
  pixels = np.random.RandomState(0).randn(2, 3, 16, 16).astype(np.float32)
  with torch.no_grad():
    want = hf_vision(pixel_values=torch.from_numpy(pixels), output_hidden_states=True).hidden_states
  _, hidden = model.vision(pixels.transpose(0, 2, 3, 1), return_hidden=True)
  assert hidden.shape[0] == len(want)
  for i, w in enumerate(want):
    np.testing.assert_allclose(np.asarray(hidden[i]), w.numpy(), atol=TOL, err_msg=f"ViT hidden state {i}")


def compare_decoder(hf, model, hf_vocab):
  tokens = np.random.RandomState(1).randint(0, hf_vocab, (2, 12)).astype(np.int32)
  with torch.no_grad():
    want = hf(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
  seg = np.ones_like(tokens)
  pos = np.tile(np.arange(12, dtype=np.int32), (2, 1))
  got, _, _ = model.decoder(model.decoder.embed(tokens), seg, pos)
  np.testing.assert_allclose(np.asarray(got)[..., :hf_vocab], want, atol=TOL)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  """A CLIPVisionModel saved without prefix (as transformers writes it)."""
  torch.manual_seed(0)
  model = randomize(transformers.CLIPVisionModel(
      transformers.CLIPVisionConfig(**VISION, attn_implementation="eager")), 1)
  return model, save(model, tmp_path_factory.mktemp("clip_vision"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """vocab 250 (padded to 256 on import), saved in several files with model.safetensors.index.json."""
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=250, **DECODER, attn_implementation="eager")
  model = randomize(transformers.LlamaForCausalLM(cfg), 2)
  directory = save(model, tmp_path_factory.mktemp("llama"), max_shard_size="40KB")
  assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
  return model, directory


def test_llama_and_clip_vision(clip, llama, tmp_path):
  (hf_vision, vision_dir), (hf, decoder_dir) = clip, llama
  assert len([f for f in os.listdir(decoder_dir) if f.endswith(".safetensors")]) > 1
  out = str(tmp_path / "ckpt")
  convert_hf.convert(vision_dir, decoder_dir, out, connector=CONNECTOR, mesh=mesh_of(1))
  meta = checkpoint.read_meta(out)
  assert meta["step"] == 0 and meta["source"]["hf_vocab_size"] == 250 and meta["source"]["vocab_size"] == 256
  cfg, model = restore(out)
  assert cfg.decoder.vocab_size == 256 and cfg.connector == CONNECTOR and cfg.vision.image_size == 16
  compare_vision(hf_vision, model)
  compare_decoder(hf, model, 250)
  # New rows: the mean of the checkpoint's rows, embedding and LM head separately.
  emb, head = np.asarray(model.decoder.embedding[...]), np.asarray(model.decoder.lm_head[...])
  want_emb = hf.model.embed_tokens.weight.detach().numpy().mean(0)
  want_head = hf.lm_head.weight.detach().numpy().mean(0)
  np.testing.assert_allclose(emb[250:], np.broadcast_to(want_emb, (6, 64)), atol=1e-6)
  np.testing.assert_allclose(head[:, 250:], np.broadcast_to(want_head[:, None], (64, 6)), atol=1e-6)

  # A stage with init_from=<out> starts from exactly these parameters.
  stage = StageConfig(name="pretrain", image_size=16, init_from=out)
  exp = Experiment(model=dataclasses.replace(cfg, dtype="bfloat16"), stages=[stage])
  mesh = mesh_of(8, fsdp=2, tensor=2, expert=2)
  _, params, _ = runner.initial_params(exp, 0, str(tmp_path), exp.model, mesh, log=lambda msg: None)
  want = flat_params(model)
  for path, var in nnx.to_flat_state(params):
    np.testing.assert_array_equal(np.asarray(var.get_value()), want[path], err_msg=str(path))


def test_qwen2_bfloat16_with_clip_model_layout(tmp_path):
  """Qwen2 (q/k/v biases, tied embeddings) stored in bfloat16; full CLIPModel (vision_model.* prefix, text tower)."""
  torch.manual_seed(0)
  clip_cfg = transformers.CLIPConfig(
      vision_config=VISION, text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, vocab_size=64), projection_dim=8)
  clip_model = randomize(transformers.CLIPModel(clip_cfg), 3)
  vision_dir = save(clip_model, tmp_path / "clip")
  cfg = transformers.Qwen2Config(vocab_size=256, tie_word_embeddings=True, **DECODER, attn_implementation="eager")
  hf = randomize(transformers.Qwen2ForCausalLM(cfg), 4)
  with torch.no_grad():  # the reference computes in float32 from the same (bfloat16-exact) weights
    for p in hf.parameters():
      p.copy_(p.to(torch.bfloat16).to(torch.float32))
  decoder_dir = save(copy.deepcopy(hf).to(torch.bfloat16), tmp_path / "qwen2")
  out = str(tmp_path / "ckpt")
  convert_hf.convert(vision_dir, decoder_dir, out, connector=CONNECTOR, vocab_size=384, mesh=mesh_of(1))
  cfg, model = restore(out)
  assert cfg.decoder.qkv_bias and cfg.decoder.tie_embeddings and cfg.decoder.vocab_size == 384
  compare_vision(clip_model.vision_model, model)
  compare_decoder(hf, model, 256)


def qwen2_moe_config(shared: int, norm_topk_prob: bool = True):
  return transformers.Qwen2MoeConfig(
      vocab_size=256, **DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
      shared_expert_intermediate_size=shared, norm_topk_prob=norm_topk_prob, decoder_sparse_step=2,
      attn_implementation="eager")


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_decoders(clip, kind, tmp_path):
  torch.manual_seed(0)
  if kind == "mixtral":
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=256, **DECODER, num_local_experts=4, num_experts_per_tok=2, attn_implementation="eager"))
  else:  # MoE in the second layer of each pair, dense FFN (intermediate_size) in the first; Qwen1.5-MoE's shared
    # expert (sigmoid-gated) and top-k weights used without renormalising
    hf = transformers.Qwen2MoeForCausalLM(qwen2_moe_config(shared=48, norm_topk_prob=False))
  hf = randomize(hf, 5)
  decoder_dir = save(hf, tmp_path / kind)
  out = str(tmp_path / "ckpt")
  convert_hf.convert(clip[1], decoder_dir, out, connector=CONNECTOR, mesh=mesh_of(1))
  cfg, model = restore(out)
  moe = cfg.decoder.moe
  assert (moe.num_experts, moe.top_k, moe.every) == ((4, 2, 1) if kind == "mixtral" else (4, 2, 2))
  assert (moe.norm_topk, moe.shared_expert_dim) == ((True, 0) if kind == "mixtral" else (False, 48))
  compare_decoder(hf, model, 256)


def open_clip_layout(hf_vision) -> dict[str, np.ndarray]:
  """An HF CLIPVisionModel's weights under open_clip's names (q, k, v stacked into in_proj), plus a text tower."""
  sd = {k.removeprefix("vision_model."): v.detach().numpy() for k, v in hf_vision.state_dict().items()}
  out = {"visual.conv1.weight": sd["embeddings.patch_embedding.weight"],
         "visual.class_embedding": sd["embeddings.class_embedding"],
         "visual.positional_embedding": sd["embeddings.position_embedding.weight"],
         "visual.ln_pre.weight": sd["pre_layrnorm.weight"], "visual.ln_pre.bias": sd["pre_layrnorm.bias"],
         "visual.ln_post.weight": sd["post_layernorm.weight"], "visual.ln_post.bias": sd["post_layernorm.bias"],
         "visual.proj": np.ones((32, 8), np.float32), "logit_scale": np.ones((), np.float32),
         "token_embedding.weight": np.ones((64, 16), np.float32),
         "transformer.resblocks.0.attn.in_proj_weight": np.ones((48, 16), np.float32)}
  for i in range(VISION["num_hidden_layers"]):
    hf, oc = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
    for n in ("weight", "bias"):
      out[oc + f"attn.in_proj_{n}"] = np.concatenate([sd[hf + f"self_attn.{p}_proj.{n}"] for p in "qkv"])
      out[oc + f"attn.out_proj.{n}"] = sd[hf + f"self_attn.out_proj.{n}"]
      out[oc + f"ln_1.{n}"], out[oc + f"ln_2.{n}"] = sd[hf + f"layer_norm1.{n}"], sd[hf + f"layer_norm2.{n}"]
      out[oc + f"mlp.c_fc.{n}"], out[oc + f"mlp.c_proj.{n}"] = sd[hf + f"mlp.fc1.{n}"], sd[hf + f"mlp.fc2.{n}"]
  return out


def test_open_clip_vision_alone(clip, tmp_path):
  """An open_clip ViT (DFN5B layout) with a random decoder of the given shape."""
  hf_vision = clip[0]
  directory = tmp_path / "open_clip"
  directory.mkdir()
  tensors = open_clip_layout(hf_vision)
  save_file(tensors, str(directory / "open_clip_model.safetensors"))
  (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
      "embed_dim": 8, "quick_gelu": True, "vision_cfg": {"image_size": 16, "layers": 2, "width": 32,
                                                         "head_width": 16, "mlp_ratio": 2.0, "patch_size": 4},
      "text_cfg": {"width": 16}}}))
  base = ModelConfig(decoder=DecoderConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                           ffn_dim=64))
  out = str(tmp_path / "ckpt")
  convert_hf.convert(str(directory), "", out, connector=CONNECTOR, mesh=mesh_of(1), base=base)
  assert checkpoint.read_meta(out)["source"]["random_init"] == ["connector", "decoder"]
  cfg, model = restore(out)
  assert cfg.vision.act == "quick_gelu" and cfg.vision.num_heads == 2 and cfg.decoder.d_model == 32
  compare_vision(hf_vision, model)
  assert np.std(np.asarray(model.decoder.embedding[...])) > 0  # initialised, not zeros
  # The torch pickle of the same weights reads the same arrays.
  import torch
  pickled = tmp_path / "open_clip_bin"
  pickled.mkdir()
  torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, str(pickled / "open_clip_pytorch_model.bin"))
  (pickled / "open_clip_config.json").write_text((directory / "open_clip_config.json").read_text())
  a = open_clip.vision_sources(convert_hf.open_vision_store(str(directory)), cfg.vision)
  b = open_clip.vision_sources(convert_hf.open_vision_store(str(pickled)), cfg.vision)
  for path in a:
    np.testing.assert_array_equal(a[path].read((slice(None),)), b[path].read((slice(None),)), err_msg=str(path))
  # Variants the ViT does not have are refused by name.
  (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"vision_cfg": {"ls_init_value": 0.1}}}))
  with pytest.raises(ValueError, match="ls_init_value"):
    convert_hf.read_vision_config(str(directory))


def test_decoder_alone(llama, tmp_path):
  """A Llama decoder with a random vision tower of the given shape."""
  hf, decoder_dir = llama
  base = ModelConfig(vision=VisionConfig(image_size=16, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64))
  out = str(tmp_path / "ckpt")
  convert_hf.convert("", decoder_dir, out, connector=CONNECTOR, mesh=mesh_of(1), base=base)
  cfg, model = restore(out)
  assert cfg.vision.depth == 1 and checkpoint.read_meta(out)["source"]["random_init"] == ["connector", "vision"]
  compare_decoder(hf, model, 250)
  with pytest.raises(ValueError, match="--model PRESET"):
    convert_hf.convert("", decoder_dir, str(tmp_path / "b"), connector=CONNECTOR, mesh=mesh_of(1))


def test_sharded_conversion_equals_unsharded(clip, tmp_path, monkeypatch):
  """2x2x2 mesh (fsdp, tensor, expert): every device reads only its block, and the arrays equal a 1-device import."""
  torch.manual_seed(0)
  hf = randomize(transformers.MixtralForCausalLM(transformers.MixtralConfig(
      vocab_size=256, **DECODER, num_local_experts=4, num_experts_per_tok=2)), 6)
  decoder_dir = save(hf, tmp_path / "mixtral")
  cfg, _ = convert_hf.model_config(convert_hf.read_vision_config(clip[1]),
                                   convert_hf.read_hf_config(decoder_dir, vision=False), connector=CONNECTOR)
  stores = hf_import.SafetensorsStore(clip[1]), hf_import.SafetensorsStore(decoder_dir)
  reads = []
  original = hf_import.SafetensorsStore.read

  def recording_read(self, name, index):
    x = original(self, name, index)
    reads.append((name, x.size / np.prod(self.shape(name))))
    return x

  monkeypatch.setattr(hf_import.SafetensorsStore, "read", recording_read)
  sharded = convert_hf.import_params(cfg, *stores, mesh_of(8, fsdp=2, tensor=2, expert=2))
  monkeypatch.undo()
  fractions = {}
  for name, fraction in reads:
    fractions.setdefault(name, set()).add(fraction)
  assert fractions["model.embed_tokens.weight"] == {0.25}  # [vocab / tensor, d_model / fsdp]
  assert fractions["lm_head.weight"] == {0.25}
  # Expert 3 lives on one expert shard; its blocks are quarters (embed over fsdp, expert_mlp over tensor).
  assert fractions["model.layers.1.block_sparse_moe.experts.3.w2.weight"] == {0.25}
  assert fractions["encoder.layers.0.mlp.fc1.weight"] == {0.25}  # [vit_mlp / tensor, vit_embed / fsdp]
  gate = sharded["decoder"]["units"]["blocks"][0]["ffn"]["gate"].get_value()  # [units, experts, d, ffn]
  assert {s.data.shape for s in gate.addressable_shards} == {(2, 2, 32, 64)}

  single = convert_hf.import_params(cfg, *stores, mesh_of(1))
  sharded, single = dict(nnx.to_flat_state(sharded)), dict(nnx.to_flat_state(single))
  assert sharded.keys() == single.keys()
  for path in single:
    np.testing.assert_array_equal(np.asarray(sharded[path].get_value()), np.asarray(single[path].get_value()),
                                  err_msg=str(path))


def test_missing_and_unsupported_tensors_are_named(clip, tmp_path):
  torch.manual_seed(0)
  directory = save(transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=256, **DECODER)),
                   tmp_path / "llama")
  file = os.path.join(directory, "model.safetensors")
  tensors = load_file(file)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
    convert_hf.convert(clip[1], directory, str(tmp_path / "a"), connector=CONNECTOR)

  tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.gate_proj.weight"]
  tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)  # Llama attention_bias: no place
  save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(ValueError, match="model.layers.0.self_attn.o_proj.bias"):
    convert_hf.convert(clip[1], directory, str(tmp_path / "b"), connector=CONNECTOR)

  tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
  with pytest.raises(ValueError, match="q_norm"):
    hf_import.decoder_config_from_hf(transformers.OlmoeConfig(**DECODER))
  assert not os.path.exists(tmp_path / "a") or not os.listdir(tmp_path / "a")


def test_vocab_size_resolution():
  assert convert_hf.resolve_vocab_size(250) == 256  # HF vocabulary rounded up to a multiple of 128
  assert convert_hf.resolve_vocab_size(32000) == 32000
  assert convert_hf.resolve_vocab_size(250, vocab_size=384) == 384
  with pytest.raises(ValueError, match="smaller than the decoder's vocabulary"):
    convert_hf.resolve_vocab_size(250, vocab_size=200)


def test_upcycle_from_the_command_line(clip, llama, tmp_path, capsys):
  hf, decoder_dir = llama
  out = str(tmp_path / "moe")
  cli.main(["convert-hf", "--vision", clip[1], "--decoder", decoder_dir, "--out", out, "--connector-hidden", "16",
            "--connector-depth", "1", "--pooled-side", "2", "--moe-experts", "4", "--moe-every", "2", "--upcycle",
            "--fsdp", "2", "--tensor", "2", "--expert", "2"])
  assert json.loads(capsys.readouterr().out)["decoder_vocab"] == 256
  cfg, model = restore(out)
  assert (cfg.decoder.moe.num_experts, cfg.decoder.moe.every) == (4, 2)
  assert checkpoint.read_meta(out)["source"]["upcycled"]
  dense = hf.state_dict()
  experts = model.decoder.units.blocks[1].ffn
  assert experts.gate.shape == (1, 4, 64, 128)  # [units, experts, d, ffn]: layer 1 is the MoE layer
  for e in range(4):  # every expert is the dense FFN of layer 1
    np.testing.assert_array_equal(np.asarray(experts.gate[...])[0, e], dense["model.layers.1.mlp.gate_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(experts.down[...])[0, e], dense["model.layers.1.mlp.down_proj.weight"].T)
  assert np.abs(np.asarray(experts.router[...])).max() > 0  # a router exists (arbitrary), experts are identical
  compare_decoder(hf, model, 250)  # so the MoE model computes the dense one
  for argv, message in [([], "give --vision, --decoder or both"),
                        (["--decoder", str(tmp_path / "none")], "none has no config.json")]:
    with pytest.raises(SystemExit, match=f"^mm15 convert-hf: .*{message}"):
      cli.main(["convert-hf", "--out", str(tmp_path / "x")] + argv)
