import pickle

import pytest

from mm15_jax.data import tokenizer as tokenizer_lib

def test_specials_after_sentencepiece_vocabulary(tok):
  specials = tok.special_tokens
  ids = sorted(specials.values())
  assert ids == list(range(tok.base_vocab_size, tok.base_vocab_size + len(specials)))
  assert tok.vocab_size % 128 == 0 and tok.vocab_size >= ids[-1] + 1 > tok.vocab_size - 128
  assert tok.image_id == specials["<image>"] >= tok.base_vocab_size
  assert (tok.bos_id, tok.eos_id) == (1, 2)  # sentencepiece's own control ids are kept
  assert tok.pad_id == specials["<pad>"]     # the model has no pad piece: a special one is added
  assert tok.img_id(1) != tok.img_id(2) and tok.row_id(3) == specials["<row_3>"]
  assert tok.col_id(16) == specials["<col_16>"] and tok.role_id("user") == specials["<|user|>"]
  with pytest.raises(ValueError):
    tok.img_id(0)
  with pytest.raises(ValueError):
    tok.row_id(17)


def test_encode_decode_round_trip_and_no_special_parsing(tok):
  for text in ["the cat sat on a mat", "zebra <image> ünïcödé [12, 340]", "two  spaces\nand a newline"]:
    ids = tok.encode(text)
    assert all(i < tok.base_vocab_size for i in ids)  # "<image>" in text is plain text
    assert tok.decode(ids) == text
  ids = [tok.bos_id, tok.img_start_id, tok.image_id] + tok.encode("red box") + [tok.end_id, tok.eos_id, tok.pad_id]
  assert tok.decode(ids) == "red box"


def test_chat_template(tok):
  messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what color"},
              {"role": "assistant", "content": "red"}, {"role": "user", "content": "and the dog"},
              {"role": "assistant", "content": "blue"}]
  ids, trained = tok.apply_chat_template(messages)
  r = tok.role_id
  expected = ([r("system")] + tok.encode("be brief") + [tok.end_id] + [r("user")] + tok.encode("what color")
              + [tok.end_id] + [r("assistant")] + tok.encode("red") + [tok.end_id] + [r("user")]
              + tok.encode("and the dog") + [tok.end_id] + [r("assistant")] + tok.encode("blue") + [tok.end_id])
  assert ids == expected and len(trained) == len(ids)
  assert [i for i, m in zip(ids, trained) if m] == tok.encode("red") + [tok.end_id] + tok.encode("blue") + [tok.end_id]
  prompt, _ = tok.apply_chat_template(messages[:4], add_generation_prompt=True)
  assert prompt == expected[:len(prompt) - 1] + [r("assistant")]
  with pytest.raises(ValueError, match="rec: message 0 has unknown role 'bot'"):
    tok.apply_chat_template([{"role": "bot", "content": "x"}], where="rec")


def test_pickle_round_trip(tok):
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode("green dog") == tok.encode("green dog")
  assert clone.special_tokens == tok.special_tokens and clone.vocab_size == tok.vocab_size


def test_missing_model_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tokenizer_lib.Tokenizer(str(tmp_path / "nope.model"))
