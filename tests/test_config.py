"""Config keys: a removed key is an error naming what replaces it; values derived from the model config."""
import pytest
from flax import nnx

from mm15_jax import cli, errors
from mm15_jax import config as config_lib
from mm15_jax.config import SplitConfig
from mm15_jax.configs import presets, tiny
from mm15_jax.models.multimodal import MultimodalModel

REPLACEMENT = r"was removed: the tile size is the stage's: set stages.<name>.image_size"


def test_removed_tile_size_names_its_replacement():
  with pytest.raises(config_lib.RemovedKeyError, match=r"'stages.sft.data.split.tile_size' " + REPLACEMENT):
    config_lib.override(tiny.get_config(), ["stages.sft.data.split.tile_size=64"])
  with pytest.raises(config_lib.RemovedKeyError, match=r"'data.split.tile_size' " + REPLACEMENT):
    SplitConfig(mode="static", tile_size=64)
  with pytest.raises(config_lib.RemovedKeyError, match=r"'tile_size' " + REPLACEMENT):
    config_lib.from_dict(SplitConfig, {"mode": "none", "tile_size": 64})
  assert "tile_size" not in config_lib.to_dict(SplitConfig())


def test_cli_reports_a_removed_key_in_one_line(tmp_path):
  with pytest.raises(errors.UserError, match=r"^--set: config key 'stages.ocr.data.split.tile_size' " + REPLACEMENT):
    cli.main(["config", "--config", "tiny", "--set", "stages.ocr.data.split.tile_size=64"])
  user = tmp_path / "old.py"
  user.write_text("from mm15_jax.config import SplitConfig\n\n"
                  "def get_config():\n  return SplitConfig(mode='static', tile_size=672)\n")
  with pytest.raises(errors.UserError, match=rf"^--config {user}: config key 'data.split.tile_size' " + REPLACEMENT):
    cli.main(["config", "--config", str(user)])


@pytest.mark.parametrize("name", ["tiny", "1b"])
def test_tokens_per_tile_is_the_models(name):
  cfg = presets.get(name)
  model = nnx.eval_shape(lambda: MultimodalModel(cfg, rngs=nnx.Rngs(0)))
  assert cfg.tokens_per_tile == model.tokens_per_tile == cfg.connector.pooled_side ** 2
