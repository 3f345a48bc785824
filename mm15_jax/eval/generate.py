"""Batched autoregressive generation with a KV cache: prefill the (image-bearing) prompt once, then one token a step.

Prompts are right-padded: row b's prompt is tokens[b, :prompt_lengths[b]]. Output: [B, max_new_tokens] int32, the
generated tokens of each row; a row that produced `eos_id` is filled with `eos_id` from there on (cut at the first
eos). The loop stops early once every row is done; rows outside `live_rows` (filler of a partly used batch) count as
done from the start. Everything runs in one jitted function per set of shapes.
`stream_generate` takes the same steps for one prompt, yielding each token as it is produced.
"""
from __future__ import annotations

import functools
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def greedy_generate(model, tokens, images, image_mask, *, image_token_id: int, eos_id: int, max_new_tokens: int,
                    prompt_lengths, image_extent=None, live_rows=None):
  """Greedy decoding (the evaluation protocol)."""
  return sample_generate(model, tokens, images, image_mask, image_token_id=image_token_id, eos_id=eos_id,
                         max_new_tokens=max_new_tokens, prompt_lengths=prompt_lengths, temperature=0.0,
                         image_extent=image_extent, live_rows=live_rows)


def sample_generate(model, tokens, images, image_mask, *, image_token_id: int, eos_id: int, max_new_tokens: int,
                    prompt_lengths, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, image_extent=None,
                    live_rows=None):
  """Temperature / nucleus (top-p) sampling; temperature 0 is greedy. `image_extent` [B, N, 4]: the images are tiles'
  source pixels for the model to enlarge (data.split.enlarge_on_device), as in training."""
  tokens = jnp.asarray(tokens, jnp.int32)
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
  if tokens.ndim != 2 or prompt_lengths.shape != tokens.shape[:1]:
    raise ValueError(f"generate: tokens {tokens.shape} must be [B, T] and prompt_lengths [B], got "
                     f"{prompt_lengths.shape}")
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  lengths = np.asarray(prompt_lengths)
  if lengths.min() < 1 or lengths.max() > tokens.shape[1]:
    raise ValueError(f"generate: prompt_lengths {lengths.tolist()} must be in [1, {tokens.shape[1]}]")
  if not 0.0 < top_p <= 1.0 or temperature < 0.0:
    raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
  live_B = jnp.ones(tokens.shape[:1], bool) if live_rows is None else jnp.asarray(live_rows, bool)
  if live_B.shape != tokens.shape[:1]:
    raise ValueError(f"generate: live_rows {live_B.shape} must be [B] for tokens {tokens.shape}")
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, tokens, images, image_mask, image_extent, prompt_lengths, live_B,
                   jax.random.key(seed), image_token_id=image_token_id, eos_id=eos_id, max_new_tokens=max_new_tokens,
                   temperature=float(temperature), top_p=float(top_p))


def pick_token(logits_BV, rng, temperature: float, top_p: float):
  """Argmax when temperature == 0, else a sample from the top-p nucleus of softmax(logits / temperature)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = mass_before_BV < top_p                     # smallest prefix whose mass reaches top_p
    threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "image_token_id", "eos_id", "max_new_tokens",
                                             "temperature", "top_p"))
def _generate(graphdef, state, tokens_BT, images, image_mask, image_extent, prompt_lengths_B, live_B, rng, *,
              image_token_id, eos_id, max_new_tokens, temperature, top_p):
  model = nnx.merge(graphdef, state)
  b, t = tokens_BT.shape
  positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  segment_ids_BT = (positions_BT < prompt_lengths_B[:, None]).astype(jnp.int32)
  logits_BTV, cache = model.prefill(tokens_BT, images, image_mask, segment_ids_BT, positions_BT,
                                    image_token_id=image_token_id, max_len=t + max_new_tokens,
                                    image_extent=image_extent)
  last_BV = jnp.take_along_axis(logits_BTV, (prompt_lengths_B - 1)[:, None, None], axis=1)[:, 0]
  rng, key = jax.random.split(rng)
  first_B = pick_token(last_BV, key, temperature, top_p)
  out_BN = jnp.full((b, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first_B)

  def cond(carry):
    i, _, _, _, done_B, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, token_B, cache, out_BN, done_B, rng = carry
    logits_BV, cache = model.decode(token_B, prompt_lengths_B + i - 1, cache)
    rng, key = jax.random.split(rng)
    next_B = jnp.where(done_B, eos_id, pick_token(logits_BV, key, temperature, top_p))
    out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, next_B[:, None], i, axis=1)
    return i + 1, next_B, cache, out_BN, done_B | (next_B == eos_id), rng

  carry = (jnp.ones((), jnp.int32), first_B, cache, out_BN, (first_B == eos_id) | ~live_B, rng)
  return jax.lax.while_loop(cond, body, carry)[3]


def stream_generate(model, tokens_1T, images, image_mask, *, image_token_id: int, stop_ids: Iterable[int],
                    max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                    image_extent=None) -> Iterator[int]:
  """One prompt ([1, T], no padding) -> its new tokens one at a time as they are produced (for a terminal); ends
  before the first stop id or after max_new_tokens. The same steps as sample_generate, driven from Python."""
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  if not 0.0 < top_p <= 1.0 or temperature < 0.0:
    raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
  tokens_1T = jnp.asarray(tokens_1T, jnp.int32)
  t = tokens_1T.shape[1]
  graphdef, state = nnx.split(model)
  sampling = dict(temperature=float(temperature), top_p=float(top_p))
  rng, key = jax.random.split(jax.random.key(seed))
  token_1, cache = _prefill_pick(graphdef, state, tokens_1T, images, image_mask, image_extent, key,
                                 image_token_id=image_token_id, max_len=t + max_new_tokens, **sampling)
  stop = set(int(i) for i in stop_ids)
  for i in range(max_new_tokens):
    token = int(token_1[0])
    if token in stop:
      return
    yield token
    if i + 1 < max_new_tokens:
      rng, key = jax.random.split(rng)
      token_1, cache = _decode_pick(graphdef, state, token_1, jnp.full((1,), t + i, jnp.int32), cache, key,
                                    **sampling)


@functools.partial(jax.jit, static_argnames=("graphdef", "image_token_id", "max_len", "temperature", "top_p"))
def _prefill_pick(graphdef, state, tokens_1T, images, image_mask, image_extent, key, *, image_token_id, max_len,
                  temperature, top_p):
  model = nnx.merge(graphdef, state)
  t = tokens_1T.shape[1]
  positions_1T = jnp.arange(t, dtype=jnp.int32)[None]
  logits_1TV, cache = model.prefill(tokens_1T, images, image_mask, jnp.ones_like(tokens_1T), positions_1T,
                                    image_token_id=image_token_id, max_len=max_len, image_extent=image_extent)
  return pick_token(logits_1TV[:, -1], key, temperature, top_p), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "top_p"), donate_argnames=("cache",))
def _decode_pick(graphdef, state, token_1, position_1, cache, key, *, temperature, top_p):
  logits_1V, cache = nnx.merge(graphdef, state).decode(token_1, position_1, cache)
  return pick_token(logits_1V, key, temperature, top_p), cache
