"""Config keys: a removed key is an error naming what replaces it; values derived from the model config."""
import json

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


def test_logging_and_profile_keys_from_the_command_line(capsys):
  cli.main(["config", "--config", "tiny", "--set", "logging.wandb=my-team/mm15", "--set", "logging.wandb_mode=offline",
            "--set", "profile.steps=2:4"])
  resolved = json.loads(capsys.readouterr().out)
  assert resolved["logging"] == {"wandb": "my-team/mm15", "wandb_mode": "offline"}
  assert resolved["profile"] == {"steps": "2:4"}
  assert config_lib.profile_steps(config_lib.ProfileConfig(steps="2:4")) == (2, 4)
  assert config_lib.profile_steps(config_lib.ProfileConfig()) is None
  defaults = tiny.get_config()
  assert defaults.logging.wandb == "" and defaults.profile.steps == ""  # both off unless asked for


@pytest.mark.parametrize("assignment, message", [
    ("logging.wandb_mode=cloud", r"config key logging.wandb_mode='cloud': must be one of online, offline, disabled"),
    ("logging.wandb=my team/mm15", r"config key logging.wandb='my team/mm15': give a W&B \"entity/project\""),
    ("logging.wandb=a/b/c", r"config key logging.wandb='a/b/c': give a W&B"),
    ("profile.steps=4:2", r"config key profile.steps='4:2': give A:B with 1 <= A < B"),
    ("profile.steps=0:3", r"config key profile.steps='0:3': give A:B with 1 <= A < B"),
    ("profile.steps=3:3", r"config key profile.steps='3:3': give A:B"),
    ("profile.steps=2-4", r"config key profile.steps='2-4': give A:B"),
])
def test_bad_logging_and_profile_values_are_one_line(assignment, message):
  with pytest.raises(errors.UserError, match="^" + message) as info:
    cli.main(["config", "--config", "tiny", "--set", assignment])
  assert "\n" not in errors.one_line(info.value)
