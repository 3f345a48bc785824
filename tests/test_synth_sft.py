"""synth_sft: every generator's records are well-formed SFT conversations; written functions work."""
import io
import re

import numpy as np
import pytest
from PIL import Image

from mm15_jax.data import synth_sft

MAKERS = [synth_sft.make_sft_science, synth_sft.make_sft_math, synth_sft.make_sft_code, synth_sft.make_sft_text_only]


@pytest.mark.parametrize("make", MAKERS, ids=lambda f: f.__name__)
def test_records_are_conversations_with_one_image_per_mark(make):
  for seed in range(30):
    r = make(np.random.default_rng(seed), "train")
    assert r["kind"] == "sft" and r["source"] == make.__name__[len("make_"):]
    roles = [m["role"] for m in r["messages"]]
    assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
    assert sum(m["content"].count("<image>") for m in r["messages"]) == len(r["images"])
    for png in r["images"]:
      with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and min(im.size) >= 16


def test_written_functions_do_what_was_asked():
  """The code answers test_synth.py cannot run from the corpus text: functions written to a spec."""
  checked = 0
  for seed in range(60):
    question, answer = (m["content"] for m in synth_sft.make_sft_code(np.random.default_rng(seed), "train")["messages"])
    if answer.startswith("def "):
      namespace = {}
      exec(answer, namespace)  # pylint: disable=exec-used
      name = re.search(r"named (\w+)", question).group(1)
      assert namespace[name](2, 5) == 7 and namespace[name](-3, 1) == -2
      checked += 1
  assert checked > 5
