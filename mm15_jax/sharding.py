"""The one place that knows mesh axis names.

Model code names logical axes only (`("embed", "mlp")`); `LOGICAL_RULES` maps them to mesh axes. Mesh axes:
  dcn_data: data parallel across slices (DCN); data: data parallel; fsdp: parameters and batch sharded;
  tensor: heads / MLP columns; expert: MoE experts.
"""
from __future__ import annotations

import contextlib
import math
import threading

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mm15_jax.config import MeshConfig

MESH_AXES = ("dcn_data", "data", "fsdp", "expert", "tensor")
BATCH_AXES = ("dcn_data", "data", "fsdp", "expert")

# logical name -> mesh axis (or tuple of axes, or None for replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "length": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "expert": "expert",
    "expert_mlp": "tensor",
    "layers": None,
    "vit_embed": "fsdp",
    "vit_heads": "tensor",
    "vit_mlp": "tensor",
    "conv_in": None,
    "conv_out": "tensor",
    "images": None,
    "tokens": None,
}


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """Resolves -1 entries so that the product equals `num_devices`."""
  sizes = {"dcn_data": cfg.dcn_data, "data": cfg.data, "fsdp": cfg.fsdp,
           "expert": cfg.expert, "tensor": cfg.tensor}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {free}")
  known = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices do not divide by the fixed axes {sizes}")
    sizes[free[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {num_devices}")
  return sizes


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  if sizes["dcn_data"] > 1 and hasattr(devices[0], "slice_index"):
    from jax.experimental import mesh_utils
    ici = tuple(1 if a == "dcn_data" else sizes[a] for a in MESH_AXES)
    dcn = tuple(sizes["dcn_data"] if a == "dcn_data" else 1 for a in MESH_AXES)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names) -> P:
  """("batch", "length", "embed") -> PartitionSpec(BATCH_AXES, None, "fsdp"); a mesh axis is used once."""
  used: set[str] = set()
  out = []
  for name in names:
    axes = LOGICAL_RULES.get(name) if name is not None else None
    if name is not None and name not in LOGICAL_RULES:
      raise KeyError(f"logical axis {name!r} has no sharding rule in mm15_jax.sharding.LOGICAL_RULES")
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else axes
    free = tuple(a for a in axes if a not in used)
    used.update(free)
    out.append(free if len(free) > 1 else (free[0] if free else None))
  return P(*out)


_state = threading.local()


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
  """Activates `mesh` for `constrain` (and jax's own sharding-in-types context)."""
  prev = getattr(_state, "mesh", None)
  _state.mesh = mesh
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _state.mesh = prev


def current_mesh() -> Mesh | None:
  return getattr(_state, "mesh", None)


def constrain(x, names):
  """Sharding constraint by logical names; a no-op outside `use_mesh` (single-device code paths)."""
  mesh = current_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names)))


def named_sharding(mesh: Mesh, names) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """An array of the batch: its leading (row) axis over the batch axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def global_batch(local_tree, mesh: Mesh):
  """Host-local numpy arrays (rows of this process) -> global jax arrays sharded over the batch axes (multi-host
  safe: process p's rows are the p-th block of the global rows)."""

  def one(x):
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, global_shape)

  return jax.tree.map(one, local_tree)


def param_shardings(abstract_state, mesh: Mesh):
  """NamedShardings from the logical axis names of every variable in an (abstract) nnx.State; an axis that does not
  divide over its mesh axes is an error naming the parameter and the mesh config keys."""
  from flax import nnx

  def one(path, spec, x):
    mesh_spec = logical_to_spec(tuple(spec))
    for size, logical, axes in zip(x.shape, tuple(spec), mesh_spec):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      ways = math.prod(mesh.shape[a] for a in axes)
      if size % ways:
        keys = ", ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
        name = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
        raise ValueError(f"parameter {name}: axis {logical!r} of size {size} does not divide "
                         f"over {keys}; choose mesh sizes that divide it")
    return NamedSharding(mesh, mesh_spec)

  return jax.tree_util.tree_map_with_path(one, nnx.get_partition_spec(abstract_state), abstract_state,
                                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
