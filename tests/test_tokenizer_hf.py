"""HF tokenizers (tokenizer.json + tokenizer_config.json, built here) against transformers.AutoTokenizer."""
import json
import pickle
import random

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from mm15_jax.data import tokenizer as tokenizer_lib  # noqa: E402

from conftest import WORDS  # noqa: E402

# Llama 3's split pattern (tiktoken's cl100k) and its instruct template.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what color is the box? "},
            {"role": "assistant", "content": "red, at [12, 340]"}, {"role": "user", "content": "and the dog\nthen"},
            {"role": "assistant", "content": "blue ünïcödé"}]
TEXTS = ["the cat sat on a mat", "zebra <image> ünïcödé [12, 340]", "two  spaces\nand a newline  ",
         "<|im_start|> is the LLM's own token", "123456 dogs"]


def _bpe(specials: list[str], split: str | None):
  from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
  tok.pre_tokenizer = (byte_level if split is None else
                       pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]))
  tok.decoder = decoders.ByteLevel()
  rng = random.Random(0)
  texts = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(300)]
  trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  tok.add_special_tokens(specials)  # as in the real files: the LLM's specials follow its BPE vocabulary
  return tok


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def hf_dir(request, tmp_path_factory):
  from tokenizers import processors
  d = tmp_path_factory.mktemp(request.param)
  if request.param == "llama3":
    tok = _bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               LLAMA3_SPLIT)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}
  else:
    tok = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None)
    config = {"bos_token": None, "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False,
                                                     "normalized": False, "rstrip": False, "single_word": False},
              "pad_token": "<|endoftext|>", "chat_template": [{"name": "default", "template": QWEN2_TEMPLATE}]}
  tok.save(str(d / "tokenizer.json"))
  config.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=4096)
  (d / "tokenizer_config.json").write_text(json.dumps(config))
  return request.param, d


def test_ids_equal_transformers(hf_dir):
  name, d = hf_dir
  ours, theirs = tokenizer_lib.Tokenizer(str(d)), transformers.AutoTokenizer.from_pretrained(str(d))
  assert ours.base_vocab_size == len(theirs)
  for text in TEXTS:
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text
    assert ours.decode(ours.encode(text)) == theirs.decode(ours.encode(text), skip_special_tokens=True)
    with_specials = theirs(text)["input_ids"]  # BOS where the LLM uses one
    assert with_specials == ([ours.bos_id] if ours.bos_id is not None else []) + ours.encode(text)
  # The project's specials follow the LLM's ids, unparsed in text; the LLM's own control tokens are kept.
  assert min(ours.special_tokens.values()) == len(theirs) and ours.vocab_size % 128 == 0
  assert ours.image_id not in ours.encode("<image>")
  assert ours.eos_id == theirs.eos_token_id
  if name == "llama3":
    assert ours.bos_id == theirs.bos_token_id and "<pad>" in ours.special_tokens
    assert ours.end_id == theirs.convert_tokens_to_ids("<|eot_id|>")
  else:
    assert ours.bos_id is None and "<bos>" not in ours.special_tokens and ours.pad_id == theirs.pad_token_id
    assert ours.end_id == theirs.convert_tokens_to_ids("<|im_end|>")
  assert tokenizer_lib.Tokenizer(str(d / "tokenizer.json")).encode(TEXTS[0]) == ours.encode(TEXTS[0])


def test_chat_equals_apply_chat_template(hf_dir):
  name, d = hf_dir
  ours, theirs = tokenizer_lib.Tokenizer(str(d)), transformers.AutoTokenizer.from_pretrained(str(d))
  assert ours.chat_template == "llm"
  bos = [ours.bos_id] if ours.bos_id is not None else []
  for messages, gen in [(MESSAGES, False), (MESSAGES[:4], True), (MESSAGES[1:3], False)]:
    ids, trained = ours.apply_chat_template(messages, add_generation_prompt=gen)
    expected = theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert bos + ids == list(expected)
    assert ours.render(messages, add_generation_prompt=gen) == theirs.apply_chat_template(
        messages, add_generation_prompt=gen, tokenize=False)
    assert len(trained) == len(ids)
  ids, trained = ours.apply_chat_template(MESSAGES)
  turn_end = theirs.decode([ours.end_id])
  trained_text = theirs.decode([i for i, m in zip(ids, trained) if m])
  closing = turn_end + ("\n" if name == "qwen2" else "")
  assert trained_text == "red, at [12, 340]" + closing + "blue ünïcödé" + closing


def test_chat_images_and_pickle(hf_dir):
  _, d = hf_dir
  tok = tokenizer_lib.Tokenizer(str(d))
  block = [tok.img_start_id, tok.image_id, tok.img_end_id]
  messages = [{"role": "user", "content": "<image>what is this"}, {"role": "assistant", "content": "a cat"}]
  ids, trained = tok.apply_chat_template(messages, image_ids=lambda: block)
  at = ids.index(tok.img_start_id)
  assert ids[at:at + 3] == block and tok.image_id not in ids[at + 3:] and trained[at:at + 3] == [0, 0, 0]
  plain, _ = tok.apply_chat_template([{"role": "user", "content": "what is this"}, messages[1]])
  assert ids[:at] + ids[at + 3:] == plain  # the mark's text is replaced by the block, the rest tokenized alike
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES)
  assert clone.special_tokens == tok.special_tokens


def test_bad_tokenizer_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
    tokenizer_lib.Tokenizer(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(ValueError, match="tokenizer.json is not a Hugging Face tokenizer"):
    tokenizer_lib.Tokenizer(str(tmp_path))


def test_sft_sample_and_prompt_are_the_llm_format(hf_dir):
  from mm15_jax.config import SplitConfig
  from mm15_jax.data import samples
  _, d = hf_dir
  tok, theirs = tokenizer_lib.Tokenizer(str(d)), transformers.AutoTokenizer.from_pretrained(str(d))
  spec = samples.SampleSpec(split=SplitConfig(mode="none"), tile_size=8, tokens_per_tile=2, seq_len=256,
                            max_images=4, max_pixels=10**6)
  record = {"kind": "sft", "images": [], "messages": MESSAGES}
  sample = samples.make_sample(record, tok, spec)
  chat = list(theirs.apply_chat_template(MESSAGES, tokenize=True, return_dict=False))
  assert sample.ids.tolist() == chat + [tok.eos_id]
  prompt = samples.encode_prompt(record, tok, spec)
  assert prompt.ids.tolist() == list(theirs.apply_chat_template(MESSAGES[:4], add_generation_prompt=True,
                                                                tokenize=True, return_dict=False))


def test_converted_embedding_rows_fit_tokenizer_and_llm(hf_dir):
  from mm15_jax.convert import convert_hf
  _, d = hf_dir
  tok = tokenizer_lib.Tokenizer(str(d))
  assert convert_hf.resolve_vocab_size(tok.base_vocab_size, tokenizer=str(d)) == tok.vocab_size
  # An LLM whose embedding has spare rows past its tokenizer (Qwen2): the specials sit there, the rows are kept.
  rows = tok.vocab_size + 300
  assert convert_hf.resolve_vocab_size(rows, tokenizer=str(d)) == -(-rows // 128) * 128
  with pytest.raises(ValueError, match="not this LLM's tokenizer"):
    convert_hf.resolve_vocab_size(tok.base_vocab_size - 1, tokenizer=str(d))
