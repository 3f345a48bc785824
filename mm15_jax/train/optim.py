"""Optimiser: AdaFactor (optax) behind global-norm clipping, warmup + cosine schedule, frozen parts.

Frozen parameters go through `optax.set_to_zero`, which keeps no state: they cost no optimiser memory.

The optimiser sees the parameters as a flat list in `jax.tree.leaves` order, each attention kernel viewed with its
(heads, head_dim) pair merged (`adafactor_views`): AdaFactor factors a second moment over the two largest axes when
both are >= 128, and head_dim (64..128) alone would leave [d, heads, head_dim] kernels with a full-size moment.
"""
from __future__ import annotations

import re

import jax
import numpy as np
import optax
from flax import nnx

from mm15_jax.config import StageConfig

MIN_DIM_SIZE_TO_FACTOR = 128  # optax.adafactor's default, named here because the state shardings depend on it


def warmup_steps(stage: StageConfig) -> int:
  return max(1, round(stage.warmup_fraction * stage.steps)) if stage.warmup_fraction > 0 else 0


def schedule(stage: StageConfig) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine decay to `end_lr_fraction * peak` at `steps`."""
  warmup = warmup_steps(stage)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=stage.learning_rate, warmup_steps=warmup,
      decay_steps=max(stage.steps, warmup + 1), end_value=stage.learning_rate * stage.end_lr_fraction)


def path_str(path) -> str:
  """('decoder', 'layers', 0, 'kernel') -> 'decoder/layers/0/kernel'.

  The `.value` that nnx.Variable leaves add to the path is not part of the parameter's name (a `...kernel$` regex
  must match).
  """
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def trainable_labels(params, pattern: str):
  """A pytree of "train" / "frozen" labels: a parameter trains when its path matches `pattern` (re.search)."""
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"config key stages.*.trainable: bad regex {pattern!r}: {e}") from e
  labels = jax.tree_util.tree_map_with_path(
      lambda p, _: "train" if regex.search(path_str(p)) else "frozen", params)
  if "train" not in jax.tree_util.tree_leaves(labels):
    raise ValueError(f"config key stages.*.trainable={pattern!r} matches no parameter")
  return labels


def adafactor_views(params) -> list[tuple[tuple, tuple[int, ...]]]:
  """(logical axis names, shape) of each parameter as the optimiser sees it, in `jax.tree.leaves` order: every
  "head_dim" axis merged into the heads axis before it."""
  specs = jax.tree.leaves(nnx.get_partition_spec(params), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  views = []
  for spec, leaf in zip(specs, jax.tree.leaves(params), strict=True):
    names, shape = [], []
    for name, size in zip(tuple(spec) or (None,) * len(leaf.shape), leaf.shape, strict=True):
      if name == "head_dim" and names:
        shape[-1] *= size
      else:
        names.append(name)
        shape.append(size)
    views.append((tuple(names), tuple(shape)))
  return views


def factored_dims(shape) -> tuple[int, int] | None:
  """(d1, d0): the axes optax.adafactor factors a second moment over (v_row drops d0, v_col drops d1), or None."""
  if len(shape) < 2:
    return None
  order = np.argsort(shape)
  return None if shape[order[-2]] < MIN_DIM_SIZE_TO_FACTOR else (int(order[-2]), int(order[-1]))


def flat_view(inner: optax.GradientTransformation, view_shapes) -> optax.GradientTransformation:
  """Runs `inner` on the list of leaves reshaped to `view_shapes`; updates come back in the caller's tree."""

  def flat(tree):
    return [x.reshape(s) for x, s in zip(jax.tree.leaves(tree), view_shapes, strict=True)]

  def init(params):
    return inner.init(flat(params))

  def update(updates, state, params=None):
    new, state = inner.update(flat(updates), state, None if params is None else flat(params))
    leaves, treedef = jax.tree.flatten(updates)
    return treedef.unflatten([u.reshape(x.shape) for u, x in zip(new, leaves)]), state

  return optax.GradientTransformation(init, update)


def make_optimizer(stage: StageConfig, params) -> optax.GradientTransformation:
  """AdaFactor with factored second moments and an absolute learning rate (the recipe's peak LRs are absolute)."""
  inner = optax.chain(
      optax.clip_by_global_norm(stage.clip_norm) if stage.clip_norm > 0 else optax.identity(),
      optax.adafactor(learning_rate=schedule(stage), multiply_by_parameter_scale=False,
                      weight_decay_rate=stage.weight_decay or None, factored=True,
                      min_dim_size_to_factor=MIN_DIM_SIZE_TO_FACTOR),
  )
  labels = jax.tree.leaves(trainable_labels(params, stage.trainable))
  per_param = optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)
  return flat_view(per_param, [shape for _, shape in adafactor_views(params)])
