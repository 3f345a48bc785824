"""The training batch: what the input pipeline yields and the train step consumes, and its global shapes.

A `Batch` is a pytree (jax.tree.map, jit and device_put see its arrays). The pipeline yields numpy arrays of this
host's rows; `sharding.global_batch` makes them the global batch; `batch_spec` gives that global batch's shapes,
dtypes and shardings without any data (AOT compiles, benchmarks).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mm15_jax import sharding
from mm15_jax.config import StageConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Batch:
  """B rows of T tokens with N image-tile slots of S x S pixels each."""
  tokens: Any          # int32 [B, T] input ids; image placeholders where tiles go
  targets: Any         # int32 [B, T] the next token of each position
  loss_mask: Any       # float32 [B, T] 1 where the target carries loss
  segment_ids: Any     # int32 [B, T] packed sample of each position (1, 2, ...), 0 padding
  positions: Any       # int32 [B, T] position within its sample
  images: Any          # uint8 [B, N, S, S, 3] tiles (their source pixels with image_extent)
  image_mask: Any      # bool [B, N] slots holding a tile
  source_ids: Any      # int32 [B, T] mixture source of each position (-1 padding)
  image_extent: Any = None  # int32 [B, N, 4] with data.split.enlarge_on_device: rows, cols of the source pixels and
                            # of the tile they are enlarged onto; else None
  # Host-side counters per row, int32 [B] ("bad_records", "samples"): logged, never sent to the devices.
  stats: dict[str, Any] = dataclasses.field(default_factory=dict)

  def without_stats(self) -> Batch:
    """What the train step takes: the model inputs and targets."""
    return dataclasses.replace(self, stats={})

  def shapes(self) -> dict[str, tuple[int, ...]]:
    """{field: shape} of the arrays it holds (stats left out)."""
    return {f.name: tuple(getattr(self, f.name).shape) for f in dataclasses.fields(self)
            if f.name != "stats" and getattr(self, f.name) is not None}

  @classmethod
  def concatenate(cls, batches) -> Batch:
    """Rows of several batches (e.g. hosts) one after the other."""
    return jax.tree.map(lambda *xs: np.concatenate(xs), *batches)


def batch_spec(stage: StageConfig, mesh) -> Batch:
  """The global batch a step of `stage` sees on `mesh` (stats left out) as sharded jax.ShapeDtypeStructs."""
  b, t, n, s = stage.batch_size, stage.data.seq_len, stage.data.max_images, stage.image_size
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
  return Batch(tokens=spec((b, t), jnp.int32), targets=spec((b, t), jnp.int32),
               loss_mask=spec((b, t), jnp.float32), segment_ids=spec((b, t), jnp.int32),
               positions=spec((b, t), jnp.int32), images=spec((b, n, s, s, 3), jnp.uint8),
               image_mask=spec((b, n), jnp.bool_), source_ids=spec((b, t), jnp.int32),
               image_extent=spec((b, n, 4), jnp.int32) if stage.data.split.enlarge_on_device else None)
