"""`mm15 data convert --format rico`: RICO-style view hierarchies + screenshots -> UI records, bad entries counted."""
import io
import json

import pytest
from PIL import Image

from mm15_jax.data import convert, convert_ui, records
from mm15_jax.data.convert_formats import ConvertOptions


def _png(width=90, height=160) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (width, height), (240, 240, 240)).save(buf, format="PNG")
  return buf.getvalue()


def _node(cls, bounds, children=(), **fields):
  return {"class": cls, "bounds": bounds, "children": list(children), **fields}


# View hierarchy coordinates are RICO's 1440x2560; the screenshot is smaller (the grid is relative to the root).
HIERARCHY = {"activity_name": "com.example.notes/.MainActivity", "activity": {"root": _node(
    "com.android.internal.policy.PhoneWindow$DecorView", [0, 0, 1440, 2560], [
        _node("android.widget.Toolbar", [0, 0, 1440, 256], [
            _node("android.widget.TextView", [144, 64, 720, 192], text="Notes"),
            _node("android.widget.ImageButton", [1296, 64, 1440, 192], **{"content-desc": "Search"})]),
        _node("android.widget.EditText", [144, 512, 1296, 768], text="Title"),
        _node("android.widget.Switch", [1152, 1024, 1440, 1280], checked=True),
        _node("android.widget.Button", [144, 2304, 720, 2560], text="Save"),
        _node("android.widget.Button", [720, 2304, 1296, 2560], text="Hidden", **{"visible-to-user": False}),
        _node("android.widget.FrameLayout", [0, 1280, 1440, 2304]),  # a container: not an element
        _node("android.widget.TextView", [1400, 2500, 1600, 2700], text="Clipped"),  # partly off screen
    ])}}
# Semantic annotations: the root node itself, componentLabel / iconClass.
SEMANTIC = _node("root", [0, 0, 1440, 2560], [
    _node("android.widget.ImageView", [0, 0, 288, 256], componentLabel="Icon", iconClass="arrow_backward"),
    _node("android.widget.TextView", [288, 0, 1152, 256], componentLabel="Text", text="Inbox"),
    _node("android.widget.LinearLayout", [0, 256, 1440, 512], componentLabel="List Item", text="Alice"),
])


@pytest.fixture
def rico_dir(tmp_path):
  d = tmp_path / "rico"
  d.mkdir()
  (d / "101.json").write_text(json.dumps(HIERARCHY))
  (d / "101.jpg").write_bytes(_png())
  (d / "202.json").write_text(json.dumps(SEMANTIC))
  (d / "202.png").write_bytes(_png(72, 128))
  (d / "303.json").write_text(json.dumps(SEMANTIC))  # no screenshot
  (d / "404.json").write_text("{not json")
  (d / "505.json").write_text(json.dumps({"activity": {"root": {"class": "x"}}}))  # no bounds
  (d / "606.json").write_text(json.dumps(SEMANTIC))
  (d / "606.png").write_bytes(b"not an image")
  return d


def _opts(kind):
  return ConvertOptions(format="rico", kind=kind, source="rico_ui", records_per_shard=4)


def test_rico_screens_become_ui_records_and_bad_entries_are_counted(rico_dir, tmp_path):
  out = tmp_path / "data"
  summary = convert.convert([str(rico_dir)], str(out), "rico_ui", _opts("sft"), max_bad_fraction=1.0, progress=None)
  assert (summary.records, summary.bad, summary.shards) == (2, 4, 2)
  assert summary.bad_by_reason == {"missing image file": 1, "unreadable json": 1, "missing field": 1,
                                   "unreadable image": 1}
  got = list(records.open_source(str(out), "rico_ui", "train"))
  assert [r["category"] for r in got] == ["ui", "ui"] and got[0]["images"][0] == (rico_dir / "101.jpg").read_bytes()
  text = "\n".join(m["content"] for r in got for m in r["messages"])
  listing = [m["content"] for m in got[0]["messages"] if m["role"] == "assistant" and ";" in m["content"]][0]
  # Boxes on the 0..1000 grid of the root's 1440x2560 bounds, clipped to it; hidden views and containers left out.
  assert listing == 'app bar; Search icon; text field "Title"; switch (on); button "Save"'
  assert "Hidden" not in text  # an invisible view
  elements = [(e.type, e.text, e.box) for e in convert_ui.screen_elements(HIERARCHY["activity"]["root"])]
  assert elements == [("app bar", "", (0, 0, 1000, 100)), ("text", "Notes", (100, 25, 500, 75)),
                      ("icon", "Search", (900, 25, 1000, 75)), ("text field", "Title", (100, 200, 900, 300)),
                      ("switch", "", (800, 400, 1000, 500)), ("button", "Save", (100, 900, 500, 1000)),
                      ("text", "Clipped", (972, 977, 1000, 1000))]  # [1400, 2500, 1440, 2560] of 1440x2560
  assert got[1]["images"][0] == (rico_dir / "202.png").read_bytes()


def test_semantic_labels_and_checked_state():
  elements = [(e.type, e.text, e.box) for e in convert_ui.screen_elements(SEMANTIC)]
  assert elements == [("icon", "arrow backward", (0, 0, 200, 100)), ("text", "Inbox", (200, 0, 800, 100)),
                      ("list item", "Alice", (0, 100, 1000, 200))]
  assert [e.state for e in convert_ui.screen_elements(HIERARCHY["activity"]["root"]) if e.type == "switch"] == ["on"]


def test_rico_held_out_task_and_option_errors(rico_dir, tmp_path):
  out = tmp_path / "data"
  summary = convert.convert([str(rico_dir / "101.json"), str(rico_dir / "202.json")], str(out), "rico_ground",
                            _opts("ui_ground"), split="test", progress=None)
  assert summary.records == 2
  for r in records.open_source(str(out), "rico_ground", "test"):
    assert r["metric"] == "iou" and len(r["messages"]) == 1 and r["answers"][0].startswith("[")
  with pytest.raises(convert.ConvertError, match="--kind 'caption'"):
    convert.convert([str(rico_dir)], str(out), "x", _opts("caption"), progress=None)
  with pytest.raises(convert.ConvertError, match="bad"):  # 4 of 6 entries bad > the default 1%
    convert.convert([str(rico_dir)], str(out), "y", _opts("sft"), progress=None)


def test_rerun_converts_only_shards_whose_files_changed(rico_dir, tmp_path):
  out, files = tmp_path / "data", [str(rico_dir / f"{k}.json") for k in ("101", "202")]
  opts = ConvertOptions(format="rico", kind="sft", source="rico_ui", records_per_shard=1)
  first = convert.convert(files, str(out), "rico_ui", opts, progress=None)
  assert len(first.converted) == 2 and not first.reused
  again = convert.convert(files, str(out), "rico_ui", opts, progress=None)
  assert not again.converted and len(again.reused) == 2
  opts = ConvertOptions(format="rico", kind="sft", source="rico_ui", records_per_shard=2)
  convert.convert(files, str(out), "rico_ui", opts, progress=None)
  (rico_dir / "202.json").write_text(json.dumps({**SEMANTIC, "children": SEMANTIC["children"][:1]}))
  changed = convert.convert(files, str(out), "rico_ui", opts, progress=None)  # the shard's second file changed
  assert len(changed.converted) == 1 and changed.records == 2
