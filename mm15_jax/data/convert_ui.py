"""RICO-style mobile screens (a view hierarchy JSON beside its screenshot) -> the UI records of synth_ui.py.

  mm15 data convert --format rico --kind sft --input DIR_OR_JSON... --out DATA_DIR --name rico_ui
  mm15 data convert --format rico --kind ui_ground --split test --input ... --out DATA_DIR --name rico_ground

An entry is one `<id>.json`: RICO's view hierarchy ({"activity": {"root": node}}) or its semantic annotations (the
root node itself). A node has "bounds" [x1, y1, x2, y2] in screen pixels, "class" (Android view class), optional
"text", "content-desc", "componentLabel" / "iconClass" (semantic annotations), "visible-to-user" and "children".
The screenshot is `<id>.jpg|.jpeg|.png|.webp` beside the JSON (or under --image-root). Boxes are mapped to the
0..1000 grid of the root's bounds, so the hierarchy's resolution (RICO: 1440x2560) need not be the screenshot's.

Kinds: "sft" writes one training conversation per screen (element OCR, widget classification, icon recognition,
grounding and the widget list, the questions drawn by a generator seeded with the entry's id); a task name of
HELD_OUT_TASKS writes one held-out question of that task per screen (use with --split test). Records are in
category "ui" unless --category names another. Bad entries (JSON that
does not parse, no root bounds, no screenshot, an unreadable screenshot, no visible element) are skipped and
counted by the converter.
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

from mm15_jax.data import synth_ui
from mm15_jax.data.convert_formats import BadEntry, ConvertOptions, Shard, check_image

HELD_OUT_TASKS = ("ui_ocr", "ui_widget", "ui_icon", "ui_ground")
KINDS = ("sft", *HELD_OUT_TASKS)
TRAIN_TASKS = ("ui_ocr", "ui_widget", "ui_icon", "ui_ground", "ui_list")
SCREENSHOT_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# RICO semantic annotation labels -> element types (others are kept, lower-cased).
COMPONENT_TYPES = {"Text Button": "button", "Text": "text", "Icon": "icon", "Input": "text field",
                   "Toolbar": "app bar", "List Item": "list item", "On/Off Switch": "switch", "Checkbox": "checkbox",
                   "Bottom Navigation": "tab bar", "Modal": "dialog", "Image": "image", "Radio Button": "radio button"}
# Android view classes (the last dotted part, most specific first) -> element types.
CLASS_TYPES = (("ImageButton", "icon"), ("EditText", "text field"), ("AutoCompleteTextView", "text field"),
               ("Switch", "switch"), ("ToggleButton", "switch"), ("CheckBox", "checkbox"),
               ("RadioButton", "radio button"), ("Button", "button"), ("Toolbar", "app bar"), ("TabView", "tab"),
               ("ImageView", "image"), ("TextView", "text"))


def node_type(node: dict) -> str:
  """An element type for a node ("" for containers and views of no known kind)."""
  label = node.get("componentLabel")
  if isinstance(label, str) and label:
    return COMPONENT_TYPES.get(label, label.lower())
  cls = str(node.get("class", "")).rsplit(".", 1)[-1]
  for suffix, type_ in CLASS_TYPES:
    if cls.endswith(suffix):
      return type_
  return ""


def node_text(node: dict, type_: str) -> str:
  if type_ == "icon" and isinstance(node.get("iconClass"), str):
    return node["iconClass"].replace("_", " ")
  for field in ("text", "content-desc"):
    value = node.get(field)
    if isinstance(value, list):
      value = " ".join(v for v in value if isinstance(v, str))
    if isinstance(value, str) and value.strip():
      return " ".join(value.split())
  return ""


def _bounds(node: Any) -> tuple[float, float, float, float] | None:
  """A node's [x1, y1, x2, y2], or None when it has none (or not four numbers)."""
  bounds = node.get("bounds") if isinstance(node, dict) else None
  if (not isinstance(bounds, list) or len(bounds) != 4
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bounds)):
    return None
  return tuple(float(v) for v in bounds)


def hierarchy_root(payload: Any) -> dict:
  """The root node of a RICO view hierarchy or semantic annotation file."""
  if isinstance(payload, dict) and isinstance(payload.get("activity"), dict):
    payload = payload["activity"].get("root")
  if not isinstance(payload, dict) or _bounds(payload) is None:
    raise BadEntry("missing field", "no root node with 'bounds' [x1, y1, x2, y2]")
  return payload


def screen_elements(root: dict) -> list[synth_ui.Element]:
  """Visible elements of known type, boxes on the 0..1000 grid of the root's bounds (clipped to it), in
  depth-first order; elements without an area inside the screen are dropped."""
  rx1, ry1, rx2, ry2 = _bounds(root)
  width, height = rx2 - rx1, ry2 - ry1
  if width <= 0 or height <= 0:
    raise BadEntry("missing field", f"root bounds {[rx1, ry1, rx2, ry2]} have no area")
  out = []
  stack = [root]
  while stack:
    node = stack.pop()
    if not isinstance(node, dict) or node.get("visible-to-user") is False or node.get("visibility") == "gone":
      continue
    children = node.get("children")
    if isinstance(children, list):
      stack.extend(reversed(children))
    box, type_ = _bounds(node), node_type(node)
    if node is root or box is None or not type_:
      continue
    x1, y1 = max(box[0], rx1), max(box[1], ry1)
    x2, y2 = min(box[2], rx2), min(box[3], ry2)
    grid = (round((x1 - rx1) * 1000 / width), round((y1 - ry1) * 1000 / height),
            round((x2 - rx1) * 1000 / width), round((y2 - ry1) * 1000 / height))
    if grid[2] <= grid[0] or grid[3] <= grid[1]:
      continue
    state = ""
    if type_ in ("switch", "checkbox", "radio button") and isinstance(node.get("checked"), bool):
      state = "on" if node["checked"] else "off"
    out.append(synth_ui.Element(type_, node_text(node, type_), grid, state))
  return out


def find_screenshot(json_path: str, image_root: str) -> epath.Path:
  folder = epath.Path(image_root) if image_root else epath.Path(json_path).parent
  stem = epath.Path(json_path).stem
  for suffix in SCREENSHOT_SUFFIXES:
    candidate = folder / (stem + suffix)
    if candidate.exists():
      return candidate
  raise BadEntry("missing image file", f"no screenshot {stem}{{{','.join(SCREENSHOT_SUFFIXES)}}} in {folder}")


def rico_screen(json_path: str, image_root: str = "") -> synth_ui.Screen:
  """One screen from its hierarchy JSON and screenshot; BadEntry when unusable."""
  try:
    payload = json.loads(epath.Path(json_path).read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise BadEntry("unreadable json", f"{json_path}: {e}") from None
  root = hierarchy_root(payload)
  elements = screen_elements(root)
  if not elements:
    raise BadEntry("no elements", "no visible element of a known type")
  image_path = find_screenshot(json_path, image_root)
  png = check_image(image_path.read_bytes(), str(image_path))
  x1, y1, x2, y2 = _bounds(root)
  activity = payload.get("activity_name", "") if isinstance(payload, dict) else ""
  app = str(activity).split("/")[0] if activity else "the"
  bars = [e for e in elements if e.type == "app bar" and e.text]
  return synth_ui.Screen(kind="", app=app, title=bars[0].text if bars else "", width=round(x2 - x1),
                         height=round(y2 - y1), elements=elements, png=png)


def rico_record(screen: synth_ui.Screen, kind: str, key: str, source: str, category: str = "") -> dict:
  rng = np.random.default_rng(zlib.crc32(key.encode()))
  if kind == "sft":
    pairs = []
    for task in TRAIN_TASKS:
      qa = synth_ui.TASKS[task][0](screen, rng)
      if qa is not None:
        pairs.append(qa)
    record = synth_ui.sft_record(source, pairs, screen.png) if pairs else None
  else:
    record = synth_ui.screen_records(kind, screen, rng, "test")
    if record is not None:
      record["source"] = source
  if record is None:
    raise BadEntry("no question", f"the screen has nothing {kind} can ask about")
  record["category"] = category or synth_ui.CATEGORY
  return record


def plan_shards(files: list[str], opts: ConvertOptions) -> list[Shard]:
  """`records_per_shard` screens per shard (a shard is labelled by its first file)."""
  return [Shard(files[start], start, min(start + opts.records_per_shard, len(files)),
                files[start:start + opts.records_per_shard]) for start in range(0, len(files), opts.records_per_shard)]


def read_rico(shard: Shard, opts: ConvertOptions) -> Iterator[tuple[str, dict | BadEntry]]:
  for path in (shard.entries if shard.entries is not None else [shard.path]):
    key = epath.Path(path).stem
    try:
      yield key, rico_record(rico_screen(path, opts.image_root), opts.kind, key, opts.source, opts.category)
    except BadEntry as e:
      yield key, e
