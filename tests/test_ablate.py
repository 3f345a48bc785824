"""`mm15 ablate`: grid parsing and checks, then one 2-point sweep on the synthetic corpus (shared stage 1 trained
once, a table row per point read from its eval report, a rerun that trains nothing, a resumed point)."""
import json

import pytest

from fixtures import compilation_cache, corpus_dir, tiny_experiment  # noqa: F401 (fixtures)
from mm15_jax import ablate, cli
from mm15_jax.train import runner

GRID = {"stages.ocr.data.seed": ["0", "1"]}  # one compiled program for both points


def experiment(data_dir, steps=2):
  """tests/fixtures' two stages, the second on the held-out suite's training split (the OCR pages need longer rows
  than the tiny model's)."""
  exp = tiny_experiment(data_dir, steps=steps)
  exp.stages[1].data.mixture, exp.stages[1].data.equal_sources = {"sft_general": 1.0}, False
  exp.stages[1].data.seq_len = 256
  return exp


def test_parse_grid_and_point_names():
  assert ablate.split_values('0.5,2') == ["0.5", "2"]
  assert ablate.split_values('{"a": 1, "b": [1, 2]},{},"x,y"') == ['{"a": 1, "b": [1, 2]}', "{}", '"x,y"']
  grid = ablate.parse_grid(["stages.sft.data.sft.alpha.text_rich=0.5,2", "stages.sft.learning_rate=1e-3"])
  assert grid == {"stages.sft.data.sft.alpha.text_rich": ["0.5", "2"], "stages.sft.learning_rate": ["1e-3"]}
  names = [p.name for p in ablate.points(grid)]
  assert names == ["text_rich=0.5,learning_rate=1e-3", "text_rich=2,learning_rate=1e-3"]
  same_tail = ablate.points({"stages.ocr.steps": ["1"], "stages.sft.steps": ["2", "3"]})
  assert [p.name for p in same_tail] == ["ocr.steps=1,sft.steps=2", "ocr.steps=1,sft.steps=3"]
  assert ablate.points({"stages.sft.data.sft.alpha": ['{"math": 1}']})[0].name == "alpha=math_1"
  # A point folder's saved config may lack fields added to the code since; any other difference is a new config.
  old = {"seed": 0, "stages": [{"name": "ocr", "data": {"mixture": {"a": 1.0}}}]}
  assert ablate._same_config(old, {"seed": 0, "stages": [{"name": "ocr", "data": {"mixture": {"a": 1.0},
                                                                                  "extra_sources": {}}}]})
  assert not ablate._same_config(old, {"seed": 0, "stages": [{"name": "ocr", "data": {"extra_sources": {"b": 0.1},
                                                                                      "mixture": {"a": 1.0}}}]})
  assert not ablate._same_config(old, {"seed": 0, "stages": [{"name": "ocr", "data": {"mixture": {"a": 1.0,
                                                                                                  "b": 1.0}}}]})
  assert not ablate._same_config({"seed": 0, "gone": 1}, {"seed": 0})
  # Where a run reports (W&B, profiling) is not part of what it trains: a rerun may change it.
  reporting = {"logging": {"wandb": "team/mm15", "wandb_mode": "offline"}, "profile": {"steps": "2:4"}}
  assert ablate._same_config(old, {**old, **reporting})
  for bad, match in ((["x"], "expected key=value"), (["a=1", "a=2"], "given twice"), (["a=1,1"], "repeated"),
                     ([], "at least one")):
    with pytest.raises(ablate.AblationError, match=match):
      ablate.parse_grid(bad)


def test_bad_grid_fails_before_anything_runs(corpus_dir, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(runner, "run_stage", lambda *a, **k: pytest.fail("trained despite a bad grid"))
  exp = tiny_experiment(corpus_dir)
  swept = ablate.swept_stages(exp, "")
  assert swept == [1]
  for grid, match in (({"stages.ocr.nope": ["1"]}, r"--grid stages.ocr.nope: .*has no field 'nope'"),
                      ({"stages.ocr.steps": ["two"]}, r"--grid stages.ocr.steps: .*expected int"),
                      ({"stages.pretrain.steps": ["1"]}, r"stage 'pretrain' is shared .* --stage"),
                      ({"model.decoder.d_model": ["8"]}, "needs every stage swept"),
                      ({"stages.ocr.data.sft.alpha.txt": ["1"]}, r"alpha.txt: .*sft.alpha: unknown \['txt'\]"),
                      ({"stages.ocr.data.sft.name": ["general+maths"]}, "unknown SFT mixture 'general\+maths'")):
    with pytest.raises(ablate.AblationError, match=match):
      ablate.check_grid(exp, grid, swept)
  ablate.check_grid(exp, {"model.decoder.d_model": ["8"]}, ablate.swept_stages(exp, "pretrain,ocr"))
  with pytest.raises(ablate.AblationError, match="unknown stage"):
    ablate.swept_stages(exp, "sft")
  with pytest.raises(SystemExit, match=r"^--grid stages.sft.nope: config key 'stages.sft.nope': StageConfig has no "
                                       r"field 'nope'$"):
    cli.main(["ablate", "--config", "tiny", "--grid", "stages.sft.nope=1,2", "--workdir", str(tmp_path / "w")])
  assert not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def sweep(corpus_dir, compilation_cache, tmp_path_factory):
  exp = experiment(corpus_dir)
  workdir = tmp_path_factory.mktemp("ablate")
  lines = []
  rows = ablate.run(exp, GRID, str(workdir), benchmarks="sft_general", max_examples=2, batch_size=2,
                    max_new_tokens=3, log=lines.append)
  return exp, workdir, rows, lines


def test_sweep_table_rows_from_each_points_report(sweep):
  exp, workdir, rows, lines = sweep
  assert [r["point"] for r in rows] == ["seed=0", "seed=1"]
  assert sum("stage pretrain: training" in line for line in lines) == 1  # stage 1 once, shared
  assert sum("stage ocr: training" in line for line in lines) == 2
  table = json.loads((workdir / "ablation.json").read_text())
  markdown = (workdir / "ablation.md").read_text().splitlines()
  assert table["grid"] == list(GRID) and len(table["points"]) == 2
  assert (workdir / "ablation.png").read_bytes()[:4] == b"\x89PNG"
  for row, saved in zip(rows, table["points"]):
    point_dir = workdir / "points" / row["point"]
    report = json.loads((point_dir / "eval" / "report.json").read_text())
    assert saved["categories"] == report["categories"] == {"General": report["benchmarks"]["sft_general"]}
    assert saved["mmbase"] is None  # the synthetic suites have no Knowledge category
    config = json.loads((point_dir / "config.json").read_text())
    assert config["stages"][1]["data"]["seed"] == int(row["values"]["stages.ocr.data.seed"])
    assert config["stages"][1]["init_from"] == str(workdir / "shared" / "pretrain" / "checkpoints")
    line = next(x for x in markdown if x.startswith(f"| {row['point']} |"))
    assert f"| {100 * report['categories']['General']:.1f} |" in line
  assert markdown[0] == "| point | stages.ocr.data.seed | General | mean | MMBase | train loss |"


def test_rerun_trains_nothing_and_a_point_resumes(sweep, monkeypatch):
  exp, workdir, rows, _ = sweep
  lines = []
  monkeypatch.setattr(runner, "run_stage", lambda *a, **k: pytest.fail("a finished point was trained again"))
  again = ablate.run(exp, GRID, str(workdir), benchmarks="sft_general", max_examples=2, batch_size=2,
                     max_new_tokens=3, log=lines.append)
  assert again == rows
  assert sum("finished earlier" in line for line in lines) == 3  # the shared stage and both points
  monkeypatch.undo()
  # The second point stopped after its last checkpoint: it resumes there and is evaluated; the first is left alone.
  second = workdir / "points" / rows[1]["point"]
  (second / "eval" / "report.json").unlink()
  (second / "ocr" / "summary.json").unlink()
  lines = []
  resumed = ablate.run(exp, GRID, str(workdir), benchmarks="sft_general", max_examples=2, batch_size=2,
                       max_new_tokens=3, log=lines.append)
  assert any("[ocr] resumed from step 2" in line for line in lines)
  assert sum("stage ocr: training" in line for line in lines) == 1
  assert resumed[0] == rows[0] and resumed[1]["categories"] == rows[1]["categories"]
  # A point folder holding another config is refused, not mixed.
  changed = experiment(exp.stages[0].data.data_dir, steps=3)
  with pytest.raises(ablate.AblationError, match="another config"):
    ablate.run(changed, GRID, str(workdir), benchmarks="sft_general", max_examples=2, log=lines.append)
