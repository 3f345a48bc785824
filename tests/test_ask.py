"""`mm15 generate`: a prompt about an image answered from a checkpoint, streamed, equal to the evaluation's answer."""
import io
import json

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from mm15_jax import cli, sharding
from mm15_jax import config as config_lib
from mm15_jax.config import (ConnectorConfig, DataConfig, DecoderConfig, Experiment, MeshConfig, ModelConfig,
                             SplitConfig, StageConfig, VisionConfig)
from mm15_jax.data.tokenizer import Tokenizer
from mm15_jax.eval import ask
from mm15_jax.eval import run as eval_run
from mm15_jax.models.multimodal import MultimodalModel
from mm15_jax.train import checkpoint


def png(h, w, color=(255, 255, 255)):
  buf = io.BytesIO()
  Image.new("RGB", (w, h), color).save(buf, "PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tok, tmp_path_factory):
  """(experiment, checkpoint dir, image path): a tiny random model saved as a checkpoint, a 40x24 picture."""
  root = tmp_path_factory.mktemp("ask")
  cfg = ModelConfig(
      vision=VisionConfig(image_size=16, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64, pre_norm=False),
      connector=ConnectorConfig(hidden=32, depth=1, pooled_side=2, se_ratio=0.0),
      decoder=DecoderConfig(vocab_size=tok.vocab_size, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2,
                            ffn_dim=64, max_len=512), dtype="float32")
  params = nnx.state(MultimodalModel(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  checkpoint.save_params(str(root / "ckpt"), params, {"model": config_lib.to_dict(cfg), "step": 0})
  data = DataConfig(tokenizer=tok.model_path, seq_len=256, max_images=8,
                    split=SplitConfig(mode="dynamic", n_min=1, n_max=2))
  exp = Experiment(model=cfg, stages=[StageConfig(name="sft", image_size=16, data=data)], mesh=MeshConfig(data=-1))
  image = root / "a.png"
  image.write_bytes(png(24, 40, (200, 30, 30)))
  return exp, str(root / "ckpt"), str(image)


def test_streamed_answer_equals_evaluation(setup):
  exp, ckpt, image = setup
  out = io.StringIO()
  answer = ask.ask(exp, ckpt, [image], "what color", n_max=4, max_new_tokens=8, out=out)
  assert out.getvalue() == answer + "\n"
  # The evaluation path (batched, one compiled loop) on the same prompt gives the same answer.
  data_cfg = exp.stages[0].data
  model, _ = eval_run.load_model(ckpt, sharding.make_mesh(exp.mesh))
  spec = eval_run.eval_spec(data_cfg, tile_size=16, tokens_per_tile=4, n_max=4)
  record = ask.prompt_record("what color", [open(image, "rb").read()])
  want = eval_run.answer(model, Tokenizer(data_cfg.tokenizer), spec, [record], batch_size=1, max_new_tokens=8,
                         n_max=4)
  assert answer.strip() == want[0]


def test_draw_boxes_and_points(tmp_path):
  out = tmp_path / "drawn.png"
  n = ask.draw_answer(png(50, 100), "the cat [100, 200, 500, 600] looks at [900, 100]", str(out), 10**6)
  pixels = np.asarray(Image.open(out).convert("RGB"))
  assert n == 2 and pixels.shape == (50, 100, 3)
  assert tuple(pixels[20, 10]) == (255, 40, 40)      # the box's left edge: x 100/1000 of 100 px, y within 10..30
  assert tuple(pixels[5, 90]) == (40, 220, 40)       # the point's centre: (90, 5)
  assert tuple(pixels[45, 50]) == (255, 255, 255)    # elsewhere untouched


def test_bad_images_are_one_line(setup, tmp_path, capsys):
  exp, ckpt, _ = setup
  config_file = tmp_path / "exp.py"
  as_json = json.dumps(json.dumps(config_lib.to_dict(exp)))
  config_file.write_text("import json\nfrom mm15_jax import config\n\n\ndef get_config():\n"
                         f"  return config.from_dict(config.Experiment, json.loads({as_json}))\n")
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not an image")
  for path, message in [(str(tmp_path / "missing.jpg"), "missing.jpg: cannot be read"),
                        (str(bad), "bad.jpg: cannot decode image")]:
    with pytest.raises(SystemExit, match=message) as e:
      cli.main(["generate", "--config", str(config_file), "--checkpoint", ckpt, "--image", path, "--prompt", "hi"])
    assert "\n" not in str(e.value)
