"""data.extra_sources: datasets added beside a stage's mixture as fixed sample shares (synthetic captions in stage 2),
keeping the four OCR sources in equal numbers in every batch."""
import numpy as np
import pytest

from mm15_jax import config as config_lib
from mm15_jax.config import Experiment, SplitConfig, StageConfig
from mm15_jax.data import mixture, pipeline
from test_pipeline import caption, config, make, ocr, segments


def sample_counts(sampler, units):
  counts, positions = {}, {}
  for u in range(units):
    for s, p in sampler(u):
      counts[s] = counts.get(s, 0) + 1
      positions.setdefault(s, []).append(p)
  return counts, positions


def test_sampler_equal_units_beside_extra_shares():
  # Sources 0-3 equal, source 4 an extra 20% of all samples: units 500 equal (2000 samples) + 500 extra per block.
  sampler = pipeline._UnitSampler([1.0] * 4 + [0.0], equal=True, seed=1, block_size=1000, extra={4: 0.2})
  counts, positions = sample_counts(sampler, 3000)
  assert counts == {0: 1500, 1: 1500, 2: 1500, 3: 1500, 4: 1500}
  assert counts[4] / sum(counts.values()) == 0.2
  for u in range(1000):  # every unit is either one sample of each OCR source or one extra sample
    assert sorted(s for s, _ in sampler(u)) in ([0, 1, 2, 3], [4])
  for s, got in positions.items():  # each source's stream is read in order, nothing skipped or repeated
    assert sorted(got) == list(range(len(got)))
  # Without extras the equal sampler is the plain one: unit u at position u of every source.
  plain = pipeline._UnitSampler([1.0] * 4, equal=True, seed=1)
  assert plain(12345) == [(s, 12345) for s in range(4)]


def test_sampler_weighted_mixture_keeps_its_proportions():
  sampler = pipeline._UnitSampler([1.0, 3.0, 0.0], equal=False, seed=2, block_size=1000, extra={2: 0.5})
  counts, _ = sample_counts(sampler, 2000)
  assert counts == {0: 250, 1: 750, 2: 1000}
  assert mixture.sample_shares({"a": 1.0, "b": 3.0}, {"c": 0.5}) == {"a": 0.125, "b": 0.375, "c": 0.5}


@pytest.mark.parametrize("pack", [False, True])
def test_stage2_with_captions_keeps_ocr_sources_equal_per_batch(tok, pack):
  names = list(mixture.STAGE2_SOURCES)
  sources = {n: [ocr(i, n) for i in range(30)] for n in names}
  sources["caption"] = [caption(i) for i in range(30)]
  cfg = config(mixture.stage2_mixture(), equal_sources=True, pack=pack, seq_len=96, max_images=15,
               split=SplitConfig(mode="static", static_grid=2), extra_sources={"caption": 0.25})
  assert pipeline.source_names(cfg) == ["caption", *sorted(names)]
  it = make(tok, cfg, sources, batch_size=8)
  captions = ocr_samples = 0
  for _ in range(6):
    counts = np.bincount([seg[1] for seg in segments(next(it), tok.image_id)], minlength=5)
    assert len(set(counts[1:].tolist())) == 1, counts  # the OCR sources: equal in every batch
    captions, ocr_samples = captions + counts[0], ocr_samples + counts[1:].sum()
  assert captions > 0 and ocr_samples > 0
  text = mixture.describe_mixture(cfg.mixture, equal_sources=True, extra_sources=cfg.extra_sources)
  assert "beside 1 extra source" in text and "caption                  weight  0.2500" in text


def test_extra_sources_config_errors_and_overrides():
  for extra, match in (({"ocr_idl": 0.1}, "already in data.mixture"), ({"caption": 1.0}, r"each in \(0, 1\)"),
                       ({"a": 0.6, "b": 0.5}, "summing below 1")):
    with pytest.raises(ValueError, match=match):
      pipeline.source_names(config(mixture.stage2_mixture(), extra_sources=extra))
  exp = Experiment(stages=[StageConfig(name="ocr")])
  config_lib.override(exp, ['stages.ocr.data.extra_sources={"synth_caption": 0.2}'])
  assert exp.stages[0].data.extra_sources == {"synth_caption": 0.2}
  config_lib.override(exp, ["stages.ocr.data.extra_sources.caption=0.1"])
  assert exp.stages[0].data.extra_sources == {"synth_caption": 0.2, "caption": 0.1}
