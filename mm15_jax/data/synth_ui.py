"""Synthetic mobile screens and Ferret-UI-style tasks on them (opt-in: `mm15 data synth --ui`).

A screen is laid out in density-independent units (dp) on a 360x640 portrait or 640x360 landscape phone and drawn
with PIL at `px_per_dp` pixels per dp: SIZES["small"] keeps screens within a tiny model's 3x3 grid of 64-pixel
tiles, SIZES["phone"] draws them at a real phone's 1080x1920. Every element has a type (ELEMENT_TYPES), its text
(or icon name) and its pixel box, which becomes a box on the 0..1000 grid of the whole screen; elements a dialog
covers are left out of the list (they are no longer visible).

Tasks, after Ferret-UI. Elementary: OCR of an element, widget classification and icon recognition of a referred box,
finding a text / icon / widget (-> its box), listing the widgets. Advanced: screen description, perception and
interaction conversations, function inference. Datasets with a held-out split ask one question per record and are
scored by task: ui_ocr (ANLS), ui_widget and ui_icon (exact), ui_ground (Acc@IoU 0.5), ui_describe (CIDEr-D).
The same task makers serve screens read from real view hierarchies (convert_ui.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

from mm15_jax.data.synth_docs import CITIES, NAMES, font, pick
from mm15_jax.data.synth_scenes import box_text, conversation, png_bytes

CATEGORY = "ui"
ELEMENT_TYPES = ("status bar", "app bar", "button", "text field", "switch", "checkbox", "icon", "text", "list item",
                 "tab", "dialog")
ICONS = ("search", "settings", "home", "heart", "star", "plus", "back", "menu", "close", "bell", "user", "share")
SIZES = {"small": 0.5, "phone": 3.0}  # px per dp: 180x320 and 1080x1920 portrait screens
PORTRAIT, LANDSCAPE = (360, 640), (640, 360)
APPS = ("Notes", "Weather", "Photos", "Music", "Mail", "Maps", "Wallet", "Fitness", "Recipes", "Travel")
SETTINGS = ("Wi-Fi", "Bluetooth", "Dark mode", "Airplane mode", "Location", "Notifications", "Auto update", "Sync")
TABS = (("Home", "home"), ("Search", "search"), ("Saved", "heart"), ("Alerts", "bell"), ("Profile", "user"))
THEMES = ((33, 150, 243), (76, 175, 80), (156, 39, 176), (255, 87, 34), (0, 150, 136), (63, 81, 181))
KINDS = ("login", "settings", "list", "search", "profile")
FUNCTIONS = {
    "login": "This screen lets the user sign in to {app} with an email and a password.",
    "settings": "This screen lets the user turn {app} settings on or off.",
    "list": "This screen shows a list of {items} in {app} that the user can open.",
    "search": "This screen lets the user search {app} and see recent results.",
    "profile": "This screen shows the profile of {name} in {app} and lets the user edit it.",
}


@dataclasses.dataclass
class Element:
  type: str  # one of ELEMENT_TYPES
  text: str  # visible text; an icon's name for icons; "" for containers
  box: tuple[int, int, int, int]  # x1, y1, x2, y2 on the 0..1000 grid of the whole screen
  state: str = ""  # "on" / "off" for switches and checkboxes


@dataclasses.dataclass
class Screen:
  kind: str  # one of KINDS, or "" for a converted screen
  app: str
  title: str
  width: int
  height: int
  elements: list[Element]
  png: bytes
  items: str = ""  # what a list screen lists
  dialog: str = ""  # the dialog's title when one is open

  def of_type(self, type_: str) -> list[Element]:
    return [e for e in self.elements if e.type == type_]


class _Canvas:
  """Draws in dp and records each element with its pixel box (mapped to the 0..1000 grid)."""

  def __init__(self, size_dp: tuple[int, int], px_per_dp: float, theme):
    self.s = px_per_dp
    self.width, self.height = round(size_dp[0] * px_per_dp), round(size_dp[1] * px_per_dp)
    self.image = Image.new("RGB", (self.width, self.height), (250, 250, 250))
    self.draw = ImageDraw.Draw(self.image)
    self.theme = theme
    self.elements: list[Element] = []

  def px(self, *values: float) -> list[float]:
    return [v * self.s for v in values]

  def font(self, dp: float):
    return font(max(6, round(dp * self.s)))

  def add(self, type_: str, text: str, box_px, state: str = "") -> Element:
    x1, y1, x2, y2 = box_px
    x1, y1 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
    x2, y2 = min(self.width, int(np.ceil(x2))), min(self.height, int(np.ceil(y2)))
    grid = (round(x1 * 1000 / self.width), round(y1 * 1000 / self.height),
            round(x2 * 1000 / self.width), round(y2 * 1000 / self.height))
    element = Element(type_, text, grid, state)
    self.elements.append(element)
    return element

  def text(self, x: float, y: float, text: str, size: float, fill=(33, 33, 33), type_: str | None = "text"):
    """Draws text with its top-left at (x, y) dp; records its tight pixel box as an element of `type_`."""
    fnt = self.font(size)
    self.draw.text(self.px(x, y), text, fill=fill, font=fnt)
    box = self.draw.textbbox(self.px(x, y), text, font=fnt)
    if type_:
      self.add(type_, text, box)
    return box

  def rect(self, x1, y1, x2, y2, fill, outline=None, radius: float = 0):
    box = self.px(x1, y1, x2, y2)
    if radius:
      self.draw.rounded_rectangle(box, radius=radius * self.s, fill=fill, outline=outline, width=max(1, round(self.s)))
    else:
      self.draw.rectangle(box, fill=fill, outline=outline, width=max(1, round(self.s)))
    return box

  def icon(self, name: str, x: float, y: float, size: float = 24, color=(66, 66, 66), record: bool = True):
    """An icon glyph in the dp square (x, y, x + size, y + size)."""
    d, w = self.draw, max(1, round(2 * self.s))
    x1, y1, x2, y2 = self.px(x + size * 0.15, y + size * 0.15, x + size * 0.85, y + size * 0.85)
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
    if name == "search":
      d.ellipse([x1, y1, cx + r * 0.3, cy + r * 0.3], outline=color, width=w)
      d.line([cx + r * 0.2, cy + r * 0.2, x2, y2], fill=color, width=w)
    elif name == "settings":
      for k in range(8):
        a = k * np.pi / 4
        d.line([cx, cy, cx + r * np.cos(a), cy + r * np.sin(a)], fill=color, width=w)
      d.ellipse([cx - r * 0.6, cy - r * 0.6, cx + r * 0.6, cy + r * 0.6], fill=color)
      d.ellipse([cx - r * 0.25, cy - r * 0.25, cx + r * 0.25, cy + r * 0.25], fill=(250, 250, 250))
    elif name == "home":
      d.polygon([(cx, y1), (x2, cy), (x1, cy)], fill=color)
      d.rectangle([x1 + r * 0.3, cy, x2 - r * 0.3, y2], fill=color)
    elif name == "heart":
      d.ellipse([x1, y1, cx, cy], fill=color)
      d.ellipse([cx, y1, x2, cy], fill=color)
      d.polygon([(x1, cy - r * 0.45), (x2, cy - r * 0.45), (cx, y2)], fill=color)
    elif name == "star":
      points = [(cx + r * (1 if k % 2 == 0 else 0.45) * np.sin(k * np.pi / 5),
                 cy - r * (1 if k % 2 == 0 else 0.45) * np.cos(k * np.pi / 5)) for k in range(10)]
      d.polygon(points, fill=color)
    elif name == "plus":
      d.line([cx, y1, cx, y2], fill=color, width=w)
      d.line([x1, cy, x2, cy], fill=color, width=w)
    elif name == "back":
      d.line([x1, cy, x2, cy], fill=color, width=w)
      d.line([x1, cy, cx, y1], fill=color, width=w)
      d.line([x1, cy, cx, y2], fill=color, width=w)
    elif name == "menu":
      for v in (y1 + r * 0.2, cy, y2 - r * 0.2):
        d.line([x1, v, x2, v], fill=color, width=w)
    elif name == "close":
      d.line([x1, y1, x2, y2], fill=color, width=w)
      d.line([x1, y2, x2, y1], fill=color, width=w)
    elif name == "bell":
      d.pieslice([x1, y1, x2, y2 + r * 0.6], 180, 360, fill=color)
      d.rectangle([x1, cy, x2, cy + r * 0.5], fill=color)
      d.ellipse([cx - r * 0.25, y2 - r * 0.4, cx + r * 0.25, y2], fill=color)
    elif name == "user":
      d.ellipse([cx - r * 0.45, y1, cx + r * 0.45, y1 + r * 0.9], fill=color)
      d.pieslice([x1, cy, x2, y2 + r], 180, 360, fill=color)
    elif name == "share":
      dots = [(x2 - r * 0.25, y1 + r * 0.25), (x1 + r * 0.25, cy), (x2 - r * 0.25, y2 - r * 0.25)]
      d.line([dots[0], dots[1], dots[2]], fill=color, width=w)
      for px_, py_ in dots:
        d.ellipse([px_ - r * 0.25, py_ - r * 0.25, px_ + r * 0.25, py_ + r * 0.25], fill=color)
    else:
      raise ValueError(f"unknown icon {name!r}")
    if record:
      self.add("icon", name, (x1, y1, x2, y2))


def _status_bar(c: _Canvas, rng, w: float) -> None:
  box = c.rect(0, 0, w, 24, fill=tuple(int(v * 0.8) for v in c.theme))
  c.add("status bar", "", box)
  clock = f"{int(rng.integers(0, 24))}:{int(rng.integers(0, 60)):02d}"
  c.text(8, 5, clock, 12, fill=(255, 255, 255), type_=None)
  c.rect(w - 28, 8, w - 10, 16, fill=(255, 255, 255))  # battery


def _app_bar(c: _Canvas, w: float, title: str, left: str, right: str) -> None:
  box = c.rect(0, 24, w, 80, fill=c.theme)
  c.add("app bar", title, box)
  c.icon(left, 8, 40, color=(255, 255, 255))
  c.text(48, 42, title, 18, fill=(255, 255, 255))
  c.icon(right, w - 40, 40, color=(255, 255, 255))


def _button(c: _Canvas, x1, y1, x2, y2, label: str) -> None:
  box = c.rect(x1, y1, x2, y2, fill=c.theme, radius=6)
  c.add("button", label, box)
  fnt = c.font(15)
  tw = c.draw.textlength(label, font=fnt) / c.s
  c.text((x1 + x2) / 2 - tw / 2, (y1 + y2) / 2 - 9, label, 15, fill=(255, 255, 255), type_=None)


def _text_field(c: _Canvas, x1, y1, x2, y2, hint: str) -> None:
  box = c.rect(x1, y1, x2, y2, fill=(255, 255, 255), outline=(150, 150, 150), radius=4)
  c.add("text field", hint, box)
  c.text(x1 + 10, (y1 + y2) / 2 - 8, hint, 14, fill=(130, 130, 130), type_=None)


def _switch(c: _Canvas, x: float, y: float, on: bool) -> None:
  box = c.rect(x, y, x + 40, y + 22, fill=c.theme if on else (190, 190, 190), radius=11)
  knob = x + 20 if on else x + 2
  c.draw.ellipse(c.px(knob + 1, y + 3, knob + 17, y + 19), fill=(255, 255, 255))
  c.add("switch", "", box, "on" if on else "off")


def _checkbox(c: _Canvas, x: float, y: float, on: bool) -> None:
  box = c.rect(x, y, x + 20, y + 20, fill=c.theme if on else (255, 255, 255), outline=(90, 90, 90))
  if on:
    c.draw.line(c.px(x + 4, y + 10, x + 9, y + 15, x + 16, y + 5), fill=(255, 255, 255), width=max(1, round(2 * c.s)))
  c.add("checkbox", "", box, "on" if on else "off")


def _tab_bar(c: _Canvas, w: float, h: float, tabs) -> None:
  c.rect(0, h - 56, w, h, fill=(240, 240, 240))
  c.draw.line(c.px(0, h - 56, w, h - 56), fill=(200, 200, 200))
  slot = w / len(tabs)
  for i, (label, icon) in enumerate(tabs):
    x1, x2 = i * slot, (i + 1) * slot
    c.add("tab", label, c.px(x1, h - 56, x2, h))
    c.icon(icon, (x1 + x2) / 2 - 12, h - 52, color=c.theme if i == 0 else (110, 110, 110), record=False)
    fnt = c.font(11)
    tw = c.draw.textlength(label, font=fnt) / c.s
    c.text((x1 + x2) / 2 - tw / 2, h - 24, label, 11, fill=(80, 80, 80), type_=None)


def _list_item(c: _Canvas, x1, y1, x2, y2, text: str, icon: str) -> None:
  c.add("list item", text, c.px(x1, y1, x2, y2))
  c.icon(icon, x1 + 8, (y1 + y2) / 2 - 12)
  c.text(x1 + 44, (y1 + y2) / 2 - 9, text, 15)
  c.draw.line(c.px(x1 + 44, y2, x2, y2), fill=(220, 220, 220))


def _dialog(c: _Canvas, w: float, h: float, title: str, message: str, buttons: tuple[str, str]) -> None:
  overlay = Image.new("RGB", c.image.size, (0, 0, 0))
  c.image.paste(Image.blend(c.image, overlay, 0.45))
  dw, dh = min(w - 48, 300), 150
  x1, y1 = (w - dw) / 2, (h - dh) / 2
  box = c.rect(x1, y1, x1 + dw, y1 + dh, fill=(255, 255, 255), radius=8)
  dialog_box = _grid(c, box)
  c.elements = [e for e in c.elements if not _overlaps(e.box, dialog_box)]  # hidden, at least in part
  c.add("dialog", title, box)
  c.text(x1 + 16, y1 + 14, title, 17)
  c.text(x1 + 16, y1 + 48, message, 13, fill=(90, 90, 90))
  _button(c, x1 + dw - 196, y1 + dh - 48, x1 + dw - 108, y1 + dh - 14, buttons[0])
  _button(c, x1 + dw - 100, y1 + dh - 48, x1 + dw - 12, y1 + dh - 14, buttons[1])


def _grid(c: _Canvas, box_px) -> tuple[int, int, int, int]:
  x1, y1, x2, y2 = box_px
  return (round(x1 * 1000 / c.width), round(y1 * 1000 / c.height), round(x2 * 1000 / c.width),
          round(y2 * 1000 / c.height))


def _overlaps(a, b) -> bool:
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def random_screen(rng: np.random.Generator, size: str = "small", *, kind: str | None = None) -> Screen:
  """One screen of a random kind (KINDS): portrait, or landscape one time in five."""
  kind = kind or pick(rng, KINDS)
  w, h = LANDSCAPE if rng.random() < 0.2 else PORTRAIT
  app, theme = pick(rng, APPS), pick(rng, THEMES)
  c = _Canvas((w, h), SIZES[size], theme)
  _status_bar(c, rng, w)
  items, dialog = "", ""
  content_bottom = h - 56 if kind in ("list", "search", "profile") else h
  if kind == "login":
    title = f"Sign in to {app}"
    _app_bar(c, w, app, "back", "menu")
    c.text(24, 100, title, 20)
    _text_field(c, 24, 140, w - 24, 184, "Email")
    _text_field(c, 24, 196, w - 24, 240, "Password")
    _checkbox(c, 24, 256, bool(rng.random() < 0.5))
    c.text(52, 257, "Remember me", 14)
    _button(c, 24, 292, w - 24, 336, "Sign in")
    if h > 400:
      c.text(24, 356, "Forgot password?", 14, fill=theme)
  elif kind == "settings":
    title = "Settings"
    _app_bar(c, w, title, "back", "search")
    names = [SETTINGS[i] for i in rng.choice(len(SETTINGS), size=(4 if h > 400 else 3), replace=False)]
    for i, name in enumerate(names):
      y = 96 + i * 56
      c.text(24, y + 10, name, 16)
      _switch(c, w - 64, y + 8, bool(rng.random() < 0.5))
  elif kind == "list":
    items = pick(rng, ("contacts", "messages", "places"))
    title = items.capitalize()
    _app_bar(c, w, title, "menu", "plus")
    names = (list(NAMES) if items != "places" else list(CITIES))
    chosen = [names[i] for i in rng.choice(len(names), size=(5 if h > 400 else 3), replace=False)]
    for i, name in enumerate(chosen):
      _list_item(c, 0, 88 + i * 56, w, 140 + i * 56, name, "user" if items != "places" else "star")
  elif kind == "search":
    title = "Search"
    _app_bar(c, w, app, "back", "settings")
    _text_field(c, 16, 96, w - 64, 136, f"Search {app}")
    c.icon("search", w - 52, 104)
    c.text(16, 152, "Recent", 14, fill=(110, 110, 110))
    for i, city in enumerate(rng.choice(len(CITIES), size=(3 if h > 400 else 2), replace=False)):
      _list_item(c, 0, 176 + i * 52, w, 224 + i * 52, CITIES[city], "star")
  else:  # profile
    name = pick(rng, NAMES)
    title = name
    _app_bar(c, w, "Profile", "back", "share")
    c.icon("user", w / 2 - 32, 96, size=64)
    c.text(w / 2 - 40, 168, name, 20)
    c.text(w / 2 - 40, 196, pick(rng, CITIES), 14, fill=(110, 110, 110))
    _button(c, 24, 232, w / 2 - 8, 272, "Edit")
    _button(c, w / 2 + 8, 232, w - 24, 272, "Follow")
    items = name
  if content_bottom < h:
    n_tabs = 4 if w < 500 else 5
    _tab_bar(c, w, h, TABS[:n_tabs])
  if kind in ("settings", "list") and rng.random() < 0.25:
    dialog = pick(rng, ("Log out?", "Delete item?", "Allow access?"))
    _dialog(c, w, h, dialog, "Are you sure?", ("Cancel", "OK"))
  return Screen(kind, app, title, c.width, c.height, c.elements, png_bytes(c.image), items=items, dialog=dialog)


# ---------------------------------------------------------------------------------------------------------------
# Tasks.

def describe_element(e: Element) -> str:
  if e.type == "icon":
    return f"{e.text} icon"
  if e.type in ("switch", "checkbox"):
    return f"{e.type} ({e.state})"
  return f"{e.type} \"{e.text}\"" if e.text else e.type


def unique(elements: list[Element], key) -> list[Element]:
  """Elements whose key no other element shares (so that a question about it has one answer)."""
  values = [key(e) for e in elements]
  return [e for e, v in zip(elements, values) if v and values.count(v) == 1]


def _with_text(screen: Screen) -> list[Element]:
  return [e for e in screen.elements if e.text and e.type not in ("icon", "status bar")]


def ocr_qa(screen: Screen, rng) -> tuple[str, str] | None:
  elements = _with_text(screen)
  if not elements:
    return None
  e = pick(rng, elements)
  return f"What text is shown in the element at {box_text(e.box)}?", e.text


def widget_qa(screen: Screen, rng) -> tuple[str, str] | None:
  e = pick(rng, screen.elements) if screen.elements else None
  return None if e is None else (f"What type of widget is at {box_text(e.box)}?", e.type)


def icon_qa(screen: Screen, rng) -> tuple[str, str] | None:
  icons = [e for e in screen.of_type("icon") if e.text]
  if not icons:
    return None
  e = pick(rng, icons)
  return f"What icon is at {box_text(e.box)}?", e.text


def ground_qa(screen: Screen, rng) -> tuple[str, str] | None:
  """Find a text, an icon or a widget type: the answer is its box (only elements the question names uniquely)."""
  by_text = unique(_with_text(screen), lambda e: e.text.lower())
  by_icon = unique(screen.of_type("icon"), lambda e: e.text)
  # The status bar is always at the top: asking for it would teach a constant answer.
  by_type = unique([e for e in screen.elements if e.type != "status bar"], lambda e: e.type)
  options = [k for k, found in (("text", by_text), ("icon", by_icon), ("type", by_type)) if found]
  if not options:
    return None
  how = pick(rng, options)
  if how == "text":
    e = pick(rng, by_text)
    return f"Where is the text \"{e.text}\"? Give its bounding box.", box_text(e.box)
  if how == "icon":
    e = pick(rng, by_icon)
    return f"Where is the {e.text} icon? Give its bounding box.", box_text(e.box)
  e = pick(rng, by_type)
  return f"Where is the {e.type}? Give its bounding box.", box_text(e.box)


def list_qa(screen: Screen, rng) -> tuple[str, str] | None:
  """Widget listing: every widget by name, or those of one half of the screen with their boxes (a whole screen's
  boxes would not fit a small model's sequence)."""
  widgets = [e for e in screen.elements if e.type not in ("status bar", "text")]
  if not widgets:
    return None
  if rng.random() < 0.5:
    return "List the widgets on this screen.", "; ".join(describe_element(e) for e in widgets)
  half = pick(rng, ("top", "bottom"))
  chosen = [e for e in widgets if ((e.box[1] + e.box[3]) / 2 < 500) == (half == "top")]
  if not chosen:
    return None
  return (f"List the widgets in the {half} half of the screen with their boxes.",
          "; ".join(f"{describe_element(e)} {box_text(e.box)}" for e in chosen))


def _counted(n: int, noun: str) -> str:
  return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("ch") else "s")


def descriptions(screen: Screen) -> list[str]:
  """Reference descriptions of a screen (several phrasings: CIDEr-D scores against all of them)."""
  counts = {t: len(screen.of_type(t)) for t in ("button", "text field", "switch", "list item", "icon")}
  parts = [_counted(n, t) for t, n in counts.items() if n]
  what = {"login": "a sign-in screen", "settings": "a settings screen", "list": f"a list of {screen.items}",
          "search": "a search screen", "profile": f"the profile of {screen.items}"}.get(screen.kind, "a screen")
  orient = "landscape" if screen.width > screen.height else "portrait"
  content = ", ".join(parts[:-1]) + f" and {parts[-1]}" if len(parts) > 1 else (parts[0] if parts else "no widgets")
  first = f"{what[0].upper()}{what[1:]} of the {screen.app} app with {content}."
  second = f"A {orient} {screen.app} screen titled \"{screen.title}\" showing {what}."
  out = [first, second]
  if screen.dialog:
    out = [s[:-1] + f", with a \"{screen.dialog}\" dialog open." for s in out]
  switches = screen.of_type("switch")
  if switches:
    on = sum(e.state == "on" for e in switches)
    out.append(f"The {screen.app} settings screen with {on} of {len(switches)} switches turned on.")
  return out


def describe_qa(screen: Screen, rng) -> tuple[str, str]:
  return pick(rng, ("Describe this screen.", "What does this screen show?")), descriptions(screen)[0]


def function_qa(screen: Screen, rng) -> tuple[str, str] | None:
  del rng
  if screen.kind not in FUNCTIONS:
    return None
  return ("What is the purpose of this screen?",
          FUNCTIONS[screen.kind].format(app=screen.app, items=screen.items, name=screen.items))


def perception_pairs(screen: Screen, rng) -> list[tuple[str, str]]:
  pairs = [("How many buttons are on this screen?", str(len(screen.of_type("button"))))]
  bars = [e for e in screen.of_type("app bar") if e.text]
  if bars:
    pairs.append(("What is the title of the app bar?", bars[0].text))
  for e in screen.of_type("switch") + screen.of_type("checkbox"):
    label = _label_of(screen, e)
    if label:
      pairs.append((f"Is the \"{label}\" {e.type} on or off?", e.state))
  if screen.dialog:
    pairs.append(("Is a dialog open?", f"Yes, the \"{screen.dialog}\" dialog."))
  order = rng.permutation(len(pairs))[:int(rng.integers(2, 4))]
  return [pairs[i] for i in order]


def _label_of(screen: Screen, control: Element) -> str:
  """The text element on the control's row (settings labels, "Remember me")."""
  mid = (control.box[1] + control.box[3]) / 2
  for e in screen.of_type("text"):
    if e.box[1] <= mid <= e.box[3]:
      return e.text
  return ""


def interaction_pairs(screen: Screen, rng) -> list[tuple[str, str]]:
  pairs = []
  for e in unique(screen.of_type("button"), lambda e: e.text):
    pairs.append((f"How do I {e.text.lower()}?", f"Tap the \"{e.text}\" button at {box_text(e.box)}."))
  for e in screen.of_type("switch"):
    label = _label_of(screen, e)
    if label:
      verb = "off" if e.state == "on" else "on"
      pairs.append((f"I want to turn {label} {verb}.", f"Tap the {label} switch at {box_text(e.box)}."))
  for e in screen.of_type("text field"):
    pairs.append((f"Where do I type the {e.text.lower()}?", f"In the \"{e.text}\" text field at {box_text(e.box)}."))
  for e in unique(screen.of_type("icon"), lambda e: e.text):
    if e.text == "back":
      pairs.append(("How do I go back?", f"Tap the back icon at {box_text(e.box)}."))
  if not pairs:
    return []
  order = rng.permutation(len(pairs))[:int(rng.integers(1, 3))]
  return [pairs[i] for i in order]


# ---------------------------------------------------------------------------------------------------------------
# Records.

def sft_record(source: str, pairs: list[tuple[str, str]], image: bytes) -> dict:
  return {"kind": "sft", "source": source, "category": CATEGORY, "messages": conversation(pairs), "images": [image]}


def held_out(source: str, question: str, answers: list[str], image: bytes, metric: str) -> dict:
  return {"kind": "sft", "source": source, "category": CATEGORY,
          "messages": [{"role": "user", "content": "<image>\n" + question}], "images": [image],
          "answers": answers, "metric": metric}


# task name -> (question maker, metric of its held-out split or "" for train-only tasks)
TASKS = {
    "ui_ocr": (ocr_qa, "anls"),
    "ui_widget": (widget_qa, "exact"),
    "ui_icon": (icon_qa, "exact"),
    "ui_ground": (ground_qa, "iou"),
    "ui_list": (list_qa, ""),
    "ui_describe": (describe_qa, "cider"),
    "ui_function": (function_qa, ""),
}
CONVERSATIONS = {"ui_perception": perception_pairs, "ui_interaction": interaction_pairs}


def screen_records(task: str, screen: Screen, rng: np.random.Generator, split: str, turns: int = 3) -> dict | None:
  """The record of `task` on `screen` (None when the screen has nothing the task can ask about).

  Train: up to `turns` questions of the task in one conversation (one for description and function). Test: one
  question, its references in `answers` (every reference description for ui_describe).
  """
  if task in CONVERSATIONS:
    pairs = CONVERSATIONS[task](screen, rng)
    return sft_record(task, pairs, screen.png) if pairs else None
  maker, metric = TASKS[task]
  if split == "test":
    qa = maker(screen, rng)
    if qa is None:
      return None
    answers = descriptions(screen) if task == "ui_describe" else [qa[1]]
    return held_out(task, qa[0], answers, screen.png, metric)
  n = 1 if task in ("ui_describe", "ui_function", "ui_list") else int(rng.integers(1, turns + 1))
  pairs, seen = [], set()
  for _ in range(n):
    qa = maker(screen, rng)
    if qa is not None and qa[0] not in seen:
      seen.add(qa[0])
      pairs.append(qa)
  return sft_record(task, pairs, screen.png) if pairs else None


def maker(task: str, size: str = "small"):
  """A record maker (rng, split) -> record for synth.py: new screens until the task has a question."""
  def make(rng: np.random.Generator, split: str) -> dict:
    while True:
      record = screen_records(task, random_screen(rng, size), rng, split)
      if record is not None:
        return record
  make.__name__ = f"make_{task}"
  return make


# name -> (train records at scale 1, test records at scale 1 or 0)
COUNTS = {"ui_ocr": (600, 100), "ui_widget": (600, 100), "ui_icon": (400, 100), "ui_ground": (800, 100),
          "ui_list": (200, 0), "ui_describe": (300, 100), "ui_function": (200, 0), "ui_perception": (300, 0),
          "ui_interaction": (300, 0)}


def datasets(size: str = "small") -> dict:
  """synth.DATASETS-style entries of the UI corpus: name -> (maker, train count, test count)."""
  if size not in SIZES:
    raise ValueError(f"UI screen size {size!r}: expected one of {sorted(SIZES)}")
  return {name: (maker(name, size), n_train, n_test) for name, (n_train, n_test) in COUNTS.items()}


def ui_mixture(sources: dict[str, float] | None = None) -> dict[str, float]:
  """{source: weight} of a UI SFT stage: the synthetic UI datasets in proportion to their train sizes, or the
  given relative weights (e.g. converted RICO datasets), normalised to sum to 1."""
  weights = {name: float(n) for name, (n, _) in COUNTS.items()} if sources is None else dict(sources)
  total = sum(weights.values())
  if not weights or total <= 0 or any(w < 0 for w in weights.values()):
    raise ValueError(f"UI mixture weights must be non-negative with a positive sum, got {weights}")
  return {name: w / total for name, w in weights.items()}
