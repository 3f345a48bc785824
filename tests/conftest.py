"""Every test runs with 8 fake CPU devices so sharded code paths really run.

Tests are dominated by XLA compiles of small programs: LLVM's optimisation passes and XLA:CPU's fusion emitters cost
more than they save there (the emitters off: a third less CPU time for test_train_step.py and test_decoder.py).
Tests that run hundreds of steps start a child process with XLA's defaults instead (test_learnability.py).
"""
import os

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
                                    "--xla_backend_optimization_level=0",
                                    "--xla_cpu_use_fusion_emitters=false"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import random  # noqa: E402  (after XLA_FLAGS: importing the tokenizer imports jax)

import pytest  # noqa: E402

WORDS = "the cat sat on a mat with red blue green box image of dog chart table text number".split()


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
  """A small sentencepiece tokenizer (byte fallback) trained on random sentences of WORDS."""
  from mm15_jax.data import tokenizer as tokenizer_lib
  rng = random.Random(0)
  texts = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(300)]
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  return tokenizer_lib.Tokenizer(tokenizer_lib.train_sentencepiece(texts, str(path), vocab_size=300))
