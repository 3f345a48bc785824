"""The LLM's tokenizer (sentencepiece `.model` or Hugging Face `tokenizer.json`) with multimodal special tokens
appended after its vocabulary, and the chat template that formats conversations.

`Tokenizer(path)`: a sentencepiece model file, or an HF tokenizer (a directory with tokenizer.json, or the file
itself; tokenizer_config.json beside it gives the BOS/EOS/PAD tokens and the chat template). The LLM's own ids are
kept: ids below `base_vocab_size` are the LLM's (its added tokens such as <|im_start|> included); the project's
specials follow, and `vocab_size` is rounded up to a multiple of 128 (the embedding table size). The project's
specials are never parsed from text: the literal string "<image>" in a document is ordinary text to `encode`
(an HF tokenizer parses only the LLM's own added tokens, as transformers does).

Special tokens (small and composable):
  <image>                      one image-token placeholder (a tile is `tokens_per_tile` of them)
  <img_start> <img_end>        around each image
  <img_1> .. <img_32>          which image of the sample (1-based)
  <row_1> .. <row_16>, <col_1> .. <col_16>   which tile of the grid (1-based), before each tile
  <overview>                   before the overview tile
  <|system|> <|user|> <|assistant|> <|end|>  the built-in template's chat roles; <|end|> closes every turn
  <pad> (and <bos>/<eos>) only when the LLM's tokenizer has none (an HF tokenizer without a BOS gets none).

Chat templates (`apply_chat_template` -> ids and the trained mask):
  built-in (sentencepiece; the synthetic corpus), no newlines or text markers, roles are single tokens:
    <|system|> content <|end|> <|user|> content <|end|> <|assistant|> content <|end|> ...
  the LLM's own (an HF tokenizer whose tokenizer_config.json or chat_template.jinja has one), rendered with jinja2
  exactly as transformers renders it and tokenized in one piece, so text-only conversations give the ids of
  transformers' apply_chat_template (without a leading BOS, which the sample builder adds).
Trained (mask 1): assistant content and the template text that closes its turn (e.g. <|eot_id|>, <|im_end|>\n).
Generation stops at `end_id`: <|end|>, or the token the LLM's template closes an assistant turn with.
"""
from __future__ import annotations

import io
import json
from typing import Callable, Iterable, Sequence

import numpy as np
from etils import epath
import sentencepiece as spm

from mm15_jax import paths

MAX_IMAGES_PER_SAMPLE = 32
MAX_GRID_SIDE = 16
ROLES = ("system", "user", "assistant")
IMAGE_MARK = "<image>"  # where an image goes in a message's content


def _special_names() -> list[str]:
  names = ["<image>", "<img_start>", "<img_end>", "<overview>"]
  names += [f"<img_{k}>" for k in range(1, MAX_IMAGES_PER_SAMPLE + 1)]
  names += [f"<row_{i}>" for i in range(1, MAX_GRID_SIDE + 1)]
  names += [f"<col_{j}>" for j in range(1, MAX_GRID_SIDE + 1)]
  names += [f"<|{r}|>" for r in ROLES] + ["<|end|>"]
  return names


def _read_bytes(path: epath.Path, what: str) -> bytes:
  try:
    return path.read_bytes()
  except Exception as e:  # OSError locally; each object-store client raises its own types
    raise paths.storage_error(path, e, what=what) from e


class SentencePieceVocab:
  """A sentencepiece model: text <-> the LLM's ids."""

  def __init__(self, model_proto: bytes):
    self.files = {"tokenizer.model": model_proto}
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.size = self._sp.get_piece_size()
    ids = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
    self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None for i in ids)
    self.add_bos = True  # the project's sample builder starts every sample with BOS
    self.chat_template = None

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: list[int]) -> str:
    return self._sp.decode(ids)

  def piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(token_id)


def _token_content(token) -> str | None:
  """tokenizer_config.json spells a token as a string or as {"content": ...}."""
  return token.get("content") if isinstance(token, dict) else token


class HFVocab:
  """A Hugging Face `tokenizers` tokenizer (tokenizer.json) with its tokenizer_config.json: text <-> the LLM's ids."""

  def __init__(self, files: dict[str, bytes], where: str):
    import tokenizers
    self.files = files
    try:
      self._tok = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode())
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
      raise ValueError(f"{where}/tokenizer.json is not a Hugging Face tokenizer: {e}") from e
    config = json.loads(files.get("tokenizer_config.json", b"{}"))
    self.size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
    self.tokens = {name: _token_content(config.get(name)) for name in
                   ("bos_token", "eos_token", "pad_token", "unk_token")}
    self.bos_id, self.eos_id, self.pad_id = (self._id(self.tokens[n], where) for n in
                                             ("bos_token", "eos_token", "pad_token"))
    # transformers adds BOS to plain text when the tokenizer's post-processor does (Llama 3: yes, Qwen2: no).
    self.add_bos = self.bos_id is not None and self.bos_id in self._tok.encode("a", add_special_tokens=True).ids
    template = files.get("chat_template.jinja", b"").decode() or config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
      template = {t["name"]: t["template"] for t in template}.get("default")
    self.chat_template = template or None

  def _id(self, token: str | None, where: str) -> int | None:
    if token is None:
      return None
    token_id = self._tok.token_to_id(token)
    if token_id is None:
      raise ValueError(f"{where}/tokenizer_config.json names the token {token!r}, which tokenizer.json does not have")
    return token_id

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """(ids, the character offset where each token starts)."""
    enc = self._tok.encode(text, add_special_tokens=False)
    return enc.ids, [start for start, _ in enc.offsets]

  def decode(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=True)

  def piece(self, token_id: int) -> str:
    return self._tok.id_to_token(token_id)


def read_vocab(path: str) -> SentencePieceVocab | HFVocab:
  """A sentencepiece .model file, or an HF tokenizer directory / tokenizer.json (with its neighbours)."""
  p = epath.Path(path)
  if p.is_dir():
    if not (p / "tokenizer.json").exists():
      if (p / "tokenizer.model").exists():
        return SentencePieceVocab(_read_bytes(p / "tokenizer.model", "tokenizer model"))
      raise FileNotFoundError(f"tokenizer directory {path!r} has neither tokenizer.json nor tokenizer.model")
    p = p / "tokenizer.json"
  if p.name.endswith(".json"):
    files = {"tokenizer.json": _read_bytes(p, "tokenizer")}
    for name in ("tokenizer_config.json", "chat_template.jinja"):
      if (p.parent / name).exists():
        files[name] = _read_bytes(p.parent / name, "tokenizer file")
    return HFVocab(files, str(p.parent))
  return SentencePieceVocab(_read_bytes(p, "tokenizer model"))


def _compile_template(source: str):
  """The chat template in the jinja2 environment transformers renders templates in."""
  import datetime

  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class Generation(jinja2.ext.Extension):
    """{% generation %} ... {% endgeneration %} (transformers' assistant-mask marker) renders its body."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(source)


def _check_messages(messages: Sequence[dict], where: str) -> None:
  for n, message in enumerate(messages):
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
      raise ValueError(f"{where}: message {n} needs 'role' and 'content', got {message!r:.80}")
    if message["role"] not in ROLES:
      raise ValueError(f"{where}: message {n} has unknown role {message['role']!r}")
    if not isinstance(message["content"], str):
      raise ValueError(f"{where}: message {n} content is {type(message['content']).__name__}, not str")


class Tokenizer:
  """`Tokenizer(path)` (see the module docstring); picklable (for Grain worker processes)."""

  def __init__(self, path: str):
    self.model_path = path
    self._init(read_vocab(path))

  def _init(self, vocab: SentencePieceVocab | HFVocab):
    self._vocab = vocab
    self.base_vocab_size = vocab.size
    names = _special_names()
    # The LLM's own control ids are used when it has them.
    if vocab.pad_id is None:
      names.append("<pad>")
    if vocab.bos_id is None and vocab.add_bos:
      names.append("<bos>")
    if vocab.eos_id is None:
      names.append("<eos>")
    self._special = {name: self.base_vocab_size + i for i, name in enumerate(names)}
    self._special_by_id = {i: n for n, i in self._special.items()}
    n = self.base_vocab_size + len(names)
    self.vocab_size = -(-n // 128) * 128
    self.pad_id = vocab.pad_id if vocab.pad_id is not None else self._special["<pad>"]
    # None: samples start without BOS (an LLM trained without one, e.g. Qwen2).
    self.bos_id = (vocab.bos_id if vocab.bos_id is not None else self._special["<bos>"]) if vocab.add_bos else None
    self.eos_id = vocab.eos_id if vocab.eos_id is not None else self._special["<eos>"]
    self.image_id = self._special["<image>"]
    self.img_start_id = self._special["<img_start>"]
    self.img_end_id = self._special["<img_end>"]
    self.overview_id = self._special["<overview>"]
    self._template = _compile_template(vocab.chat_template) if vocab.chat_template else None
    self.end_id = self._special["<|end|>"] if self._template is None else self._turn_end_id()

  def __getstate__(self):
    return {"model_path": self.model_path, "files": self._vocab.files}

  def __setstate__(self, state):
    self.model_path = state["model_path"]
    files = state["files"]
    vocab = (HFVocab(files, self.model_path) if "tokenizer.json" in files
             else SentencePieceVocab(files["tokenizer.model"]))
    self._init(vocab)

  @property
  def files(self) -> dict[str, bytes]:
    """The LLM tokenizer's files by name: tokenizer.model, or tokenizer.json (+ tokenizer_config.json,
    chat_template.jinja when it has them)."""
    return dict(self._vocab.files)

  @property
  def chat_template(self) -> str:
    """"llm" (the LLM's own, from its tokenizer files) or "built-in"."""
    return "built-in" if self._template is None else "llm"

  @property
  def special_tokens(self) -> dict[str, int]:
    return dict(self._special)

  def special_id(self, name: str) -> int:
    if name not in self._special:
      raise KeyError(f"unknown special token {name!r}")
    return self._special[name]

  def img_id(self, k: int) -> int:
    """Image index indicator, k = 1 .. MAX_IMAGES_PER_SAMPLE."""
    if not 1 <= k <= MAX_IMAGES_PER_SAMPLE:
      raise ValueError(f"image index {k} outside 1..{MAX_IMAGES_PER_SAMPLE}")
    return self._special[f"<img_{k}>"]

  def row_id(self, i: int) -> int:
    if not 1 <= i <= MAX_GRID_SIDE:
      raise ValueError(f"tile row {i} outside 1..{MAX_GRID_SIDE}")
    return self._special[f"<row_{i}>"]

  def col_id(self, j: int) -> int:
    if not 1 <= j <= MAX_GRID_SIDE:
      raise ValueError(f"tile column {j} outside 1..{MAX_GRID_SIDE}")
    return self._special[f"<col_{j}>"]

  def role_id(self, role: str) -> int:
    if role not in ROLES:
      raise ValueError(f"unknown chat role {role!r}; expected one of {ROLES}")
    return self._special[f"<|{role}|>"]

  def is_special(self, token_id: int) -> bool:
    return token_id >= self.base_vocab_size or token_id in (self.bos_id, self.eos_id, self.pad_id, self.end_id)

  def encode(self, text: str) -> list[int]:
    """Plain text -> the LLM's ids; no BOS/EOS, none of the project's special tokens parsed."""
    return self._vocab.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> text; special, control and out-of-vocabulary ids are dropped."""
    ids = [int(i) for i in np.asarray(list(ids)).reshape(-1)]
    return self._vocab.decode([i for i in ids if 0 <= i < self.base_vocab_size])

  def id_to_piece(self, token_id: int) -> str:
    if token_id in self._special_by_id:
      return self._special_by_id[token_id]
    if 0 <= token_id < self.base_vocab_size:
      return self._vocab.piece(token_id)
    return "<unused>"

  def apply_chat_template(
      self, messages: Sequence[dict], *, add_generation_prompt: bool = False,
      image_ids: Callable[[], list[int]] | None = None, where: str = "messages",
  ) -> tuple[list[int], list[int]]:
    """Messages -> (ids, trained) without BOS/EOS. trained[t] = 1 on assistant content and its turn's end.

    `image_ids()` gives the ids of the next image; each IMAGE_MARK in a content string is replaced by them (without
    image_ids, the mark is plain text). With add_generation_prompt, the assistant header is appended.
    """
    _check_messages(messages, where)
    if self._template is None:
      return self._builtin_chat(messages, add_generation_prompt, image_ids)
    return self._llm_chat(messages, add_generation_prompt, image_ids, where)

  def _with_images(self, text: str, image_ids) -> list[int]:
    if image_ids is None:
      return self.encode(text)
    ids = []
    for n, piece in enumerate(text.split(IMAGE_MARK)):
      if n:
        ids += image_ids()
      ids += self.encode(piece) if piece else []
    return ids

  def _builtin_chat(self, messages, add_generation_prompt, image_ids):
    ids, trained = [], []
    for message in messages:
      body = self._with_images(message["content"], image_ids) + [self.end_id]
      flag = 1 if message["role"] == "assistant" else 0
      ids += [self.role_id(message["role"])] + body
      trained += [0] + [flag] * len(body)
    if add_generation_prompt:
      ids.append(self.role_id("assistant"))
      trained.append(0)
    return ids, trained

  def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
    """The LLM's chat template applied to `messages`, as transformers renders it (text, not ids)."""
    tokens = {name: value for name, value in self._vocab.tokens.items() if value is not None}
    return self._template.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                 add_generation_prompt=add_generation_prompt, **tokens)

  def _llm_chat(self, messages, add_generation_prompt, image_ids, where):
    # The conversation is rendered once per prefix: message n is the text its render adds to the one of the messages
    # before it; its content is found in that text. Spans: (start, end) of content (images go there) and trained text.
    text, contents, trained_spans = "", [], []
    for n, message in enumerate(messages):
      full = self.render(messages[:n + 1])
      if not full.startswith(text):
        raise ValueError(f"{where}: the chat template of {self.model_path} rewrites earlier messages when message {n} "
                         f"follows; such a template cannot mark the trained tokens")
      content = message["content"]
      start = full.find(content, len(text)) if content else -1
      if start < 0 and content.strip():
        content = content.strip()  # templates often trim contents
        start = full.find(content, len(text))
      if start < 0:
        if message["role"] == "assistant" or IMAGE_MARK in content:
          raise ValueError(f"{where}: message {n}: the chat template of {self.model_path} does not render its "
                           f"content verbatim ({message['content']!r:.60})")
      else:
        contents.append((start, start + len(content)))
        if message["role"] == "assistant":
          trained_spans.append((start, len(full)))
      text = full
    if add_generation_prompt:
      full = self.render(messages, add_generation_prompt=True)
      if not full.startswith(text):
        raise ValueError(f"{where}: the chat template of {self.model_path} changes the conversation when asked for "
                         f"a generation prompt")
      text = full
    return self._encode_spans(text, contents if image_ids is not None else [], trained_spans, image_ids)

  def _encode_spans(self, text, contents, trained_spans, image_ids):
    """Tokenizes `text` in one piece between image marks (those inside content spans), marking tokens that start
    inside a trained span."""
    cuts = []  # (start, end) of each image mark
    for start, end in contents:
      at = text.find(IMAGE_MARK, start, end)
      while at >= 0:
        cuts.append((at, at + len(IMAGE_MARK)))
        at = text.find(IMAGE_MARK, at + len(IMAGE_MARK), end)
    ids, trained, begin = [], [], 0
    for at, after in cuts + [(len(text), len(text))]:
      piece_ids, offsets = self._vocab.encode_with_offsets(text[begin:at]) if at > begin else ([], [])
      ids += piece_ids
      trained += [int(any(s <= begin + o < e for s, e in trained_spans)) for o in offsets]
      if at < len(text):
        block = image_ids()
        ids += block
        trained += [0] * len(block)
      begin = after
    if ids and self.bos_id is not None and ids[0] == self.bos_id:
      ids, trained = ids[1:], trained[1:]  # the template's BOS: the sample builder adds it
    return ids, trained

  def _turn_end_id(self) -> int:
    """The token the LLM's template closes an assistant turn with (the first token after its content)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Fine"}]
    full = self.render(probe)
    start = full.find("Fine", len(self.render(probe[:1])))
    tail = self.encode(full[start + len("Fine"):]) if start >= 0 else []
    return tail[0] if tail else self.eos_id


def train_sentencepiece(texts: Iterable[str], model_path: str, *, vocab_size: int = 512,
                        model_type: str = "bpe") -> str:
  """Trains a small byte-fallback sentencepiece model (synthetic corpora, tests); returns model_path.

  Identity normalisation keeps whitespace and newlines so transcriptions round-trip; one thread, no sampling and an
  in-memory writer make the model bytes a function of `texts` alone.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
      hard_vocab_limit=False,  # small corpora (tests) get a smaller vocabulary instead of an error
      byte_fallback=True, split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
      remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, num_threads=1,
      shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2)
  epath.Path(model_path).write_bytes(model.getvalue())
  return model_path
