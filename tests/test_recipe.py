"""configs/mm15.py holds the paper's stage settings (MM1.5, arXiv 2409.20566, section 3 and appendix A)."""
import pytest

from mm15_jax import sharding
from mm15_jax.configs import mm15
from mm15_jax.data import mixture
from mm15_jax.train import optim


@pytest.fixture(scope="module")
def stages():
  return {s.name: s for s in mm15.get_config(data_dir="gs://b/data").stages}


def test_stage1_pretrain(stages):
  s = stages["pretrain"]
  assert (s.steps, s.batch_size, s.image_size, s.trainable) == (200_000, 512, 378, ".*")
  assert s.data.seq_len == 4096 and s.data.max_images == 16 and s.data.split.mode == "none"
  assert s.data.mixture == pytest.approx({"caption": 0.5, "interleaved": 0.1, "text": 0.4})


def test_stage2_ocr(stages):
  s = stages["ocr"]
  assert (s.steps, s.batch_size, s.image_size, s.init_from) == (30_000, 256, 672, "previous")
  assert s.data.equal_sources and sorted(s.data.mixture) == sorted(mixture.STAGE2_SOURCES)
  split = s.data.split
  assert (split.mode, split.static_grid, split.overview) == ("static", 2, True)


def test_stage3_sft(stages):
  s = stages["sft"]
  assert (s.batch_size, s.image_size, s.init_from, s.epochs) == (256, 672, "previous", 1.0)  # "SFT for one epoch"
  split = s.data.split
  assert (split.mode, split.n_min, split.n_max) == ("dynamic", 4, 9)
  shares = {mixture.SFT_SOURCE_CATEGORIES[src]: w for src, w in s.data.mixture.items()}
  want = {"text_rich": .372, "refer_ground": .225, "general": .113, "math": .056, "code": .023, "science": .011,
          "multi_image": .1, "text_only": .1}
  assert shares == pytest.approx(want, abs=6e-4)


@pytest.mark.parametrize("name", ["ocr", "sft"])
def test_continual_pretraining_and_sft_schedule(stages, name):
  """Peak 1e-5, cosine decay to 0 at the last step (the paper's words for both stages)."""
  s = stages[name]
  lr = optim.schedule(s)
  warmup = optim.warmup_steps(s)
  assert s.learning_rate == 1e-5 and warmup == round(0.01 * s.steps)
  assert float(lr(0)) == 0.0
  assert float(lr(warmup)) == pytest.approx(1e-5)
  assert float(lr(warmup + (s.steps - warmup) // 2)) == pytest.approx(0.5e-5, rel=1e-3)  # cosine midpoint
  assert float(lr(s.steps)) == 0.0


@pytest.mark.parametrize("slice_name,chips", [("v5p-128", 64), ("v6e-256", 256)])
def test_every_preset_steps_whole_rows_on_every_chip_of_its_slice(slice_name, chips):
  """Each micro-step's rows divide over the slice's chips (the batch axes span them all): on v6e-256 stages 2 and
  3 hold one row per chip, so v5p-128's grad_accum 2 would leave half the chips without a row."""
  for size in mm15.SLICES["v5p-128"]:
    exp = mm15.get_config(size=size, slice=slice_name)
    assert sharding.mesh_shape(exp.mesh, chips)["tensor"] == 1, size  # every chip on a batch axis
    for s in exp.stages:
      rows_per_chip = s.batch_size / s.grad_accum / chips
      assert rows_per_chip >= 1 and rows_per_chip == int(rows_per_chip), (size, s.name, s.grad_accum)
  with pytest.raises(ValueError, match=r"slice='v4': the recipe is sized for \['v5p-128', 'v6e-256'\]"):
    mm15.get_config(slice="v4")
