"""Sentencepiece tokenizer with multimodal special tokens appended after its vocabulary.

The LLM's own tokenizer.model works unchanged: ids below `sp_vocab_size` are sentencepiece's; the specials follow,
and `vocab_size` is rounded up to a multiple of 128 (the embedding table size). Specials are never parsed from text:
the literal string "<image>" in a document is ordinary text to `encode`.

Special tokens (small and composable):
  <image>                      one image-token placeholder (a tile is `tokens_per_tile` of them)
  <img_start> <img_end>        around each image
  <img_1> .. <img_32>          which image of the sample (1-based)
  <row_1> .. <row_16>, <col_1> .. <col_16>   which tile of the grid (1-based), before each tile
  <overview>                   before the overview tile
  <|system|> <|user|> <|assistant|> <|end|>  chat roles; <|end|> closes every turn
  <pad> (and <bos>/<eos>) only when the sentencepiece model has none.

Chat template (no newlines or text markers; roles are single tokens):
  <|system|> content <|end|> <|user|> content <|end|> <|assistant|> content <|end|> ...
Trained (mask 1): assistant content and the <|end|> that closes it. Generation stops at <|end|> or EOS.
"""
from __future__ import annotations

import io

from typing import Callable, Iterable, Sequence

import numpy as np
from etils import epath
import sentencepiece as spm

from mm15_jax import paths

MAX_IMAGES_PER_SAMPLE = 32
MAX_GRID_SIDE = 16
ROLES = ("system", "user", "assistant")


def _special_names() -> list[str]:
  names = ["<image>", "<img_start>", "<img_end>", "<overview>"]
  names += [f"<img_{k}>" for k in range(1, MAX_IMAGES_PER_SAMPLE + 1)]
  names += [f"<row_{i}>" for i in range(1, MAX_GRID_SIDE + 1)]
  names += [f"<col_{j}>" for j in range(1, MAX_GRID_SIDE + 1)]
  names += [f"<|{r}|>" for r in ROLES] + ["<|end|>"]
  return names


class Tokenizer:
  """`Tokenizer(model_path)` or `Tokenizer(model_proto=bytes)`; picklable (for Grain worker processes)."""

  def __init__(self, model_path: str | None = None, *, model_proto: bytes | None = None):
    if (model_path is None) == (model_proto is None):
      raise ValueError("Tokenizer: give exactly one of model_path, model_proto")
    if model_proto is None:
      try:
        model_proto = epath.Path(model_path).read_bytes()
      except Exception as e:  # OSError locally; each object-store client raises its own types
        raise paths.storage_error(model_path, e, what="tokenizer model") from e
    self._proto = model_proto
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.sp_vocab_size = self._sp.get_piece_size()
    names = _special_names()
    # Sentencepiece's own control ids are used when it has them.
    if self._sp.pad_id() < 0:
      names.append("<pad>")
    if self._sp.bos_id() < 0:
      names.append("<bos>")
    if self._sp.eos_id() < 0:
      names.append("<eos>")
    self._special = {name: self.sp_vocab_size + i for i, name in enumerate(names)}
    self._special_by_id = {i: n for n, i in self._special.items()}
    n = self.sp_vocab_size + len(names)
    self.vocab_size = -(-n // 128) * 128
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._special["<pad>"]
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else self._special["<bos>"]
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else self._special["<eos>"]
    self.image_id = self._special["<image>"]
    self.img_start_id = self._special["<img_start>"]
    self.img_end_id = self._special["<img_end>"]
    self.overview_id = self._special["<overview>"]
    self.end_id = self._special["<|end|>"]

  def __getstate__(self):
    return {"model_path": self.model_path, "model_proto": self._proto}

  def __setstate__(self, state):
    self.__init__(model_proto=state["model_proto"])
    self.model_path = state["model_path"]

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
    return token_id >= self.sp_vocab_size or token_id in (self.bos_id, self.eos_id, self.pad_id)

  def encode(self, text: str) -> list[int]:
    """Plain text -> sentencepiece ids; no BOS/EOS, no special tokens parsed."""
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> text; special, control and out-of-vocabulary ids are dropped."""
    ids = [int(i) for i in np.asarray(list(ids)).reshape(-1)]
    return self._sp.decode([i for i in ids if 0 <= i < self.sp_vocab_size])

  def id_to_piece(self, token_id: int) -> str:
    if token_id in self._special_by_id:
      return self._special_by_id[token_id]
    if 0 <= token_id < self.sp_vocab_size:
      return self._sp.id_to_piece(token_id)
    return "<unused>"

  def apply_chat_template(
      self, messages: Sequence[dict], *, add_generation_prompt: bool = False,
      encode_content: Callable[[str], list[int]] | None = None, where: str = "messages",
  ) -> tuple[list[int], list[int]]:
    """Messages -> (ids, trained) without BOS/EOS. trained[t] = 1 on assistant content and its <|end|>.

    `encode_content(text) -> ids` lets callers splice image blocks into a content string (default: `encode`).
    With add_generation_prompt, the assistant header is appended (for generation).
    """
    encode_content = encode_content or self.encode
    ids, trained = [], []
    for n, message in enumerate(messages):
      if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"{where}: message {n} needs 'role' and 'content', got {message!r:.80}")
      role, content = message["role"], message["content"]
      if role not in ROLES:
        raise ValueError(f"{where}: message {n} has unknown role {role!r}")
      if not isinstance(content, str):
        raise ValueError(f"{where}: message {n} content is {type(content).__name__}, not str")
      body = encode_content(content) + [self.end_id]
      flag = 1 if role == "assistant" else 0
      ids += [self.role_id(role)] + body
      trained += [0] + [flag] * len(body)
    if add_generation_prompt:
      ids.append(self.role_id("assistant"))
      trained.append(0)
    return ids, trained


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
