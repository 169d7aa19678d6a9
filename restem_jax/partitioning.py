"""Sharding declared in one place: the mesh, logical-axis rules, NamedShardings.

Every parameter and main activation in model.py carries logical axis names
("embed", "heads", "act_batch", ...). `LOGICAL_RULES` maps them onto the mesh
axes (data, fsdp, tensor). Params, optimizer state, caches and batches all get
their shardings from these rules; no call site writes a PartitionSpec by hand.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from restem_jax import configlib, errors
from restem_jax.errors import ConfigError  # noqa: F401  (re-export; use errors.ConfigError)

MESH_AXES = ("data", "fsdp", "tensor")
# Batch-like dimensions are split over both data-parallel axes: fsdp shards the
# parameters *and* the batch (ZeRO-3 style), data only the batch.
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    # Activations.
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # KV cache: [layers, batch, kv_heads, length, head_dim] (kv_heads use act_kv_heads).
    ("cache_layers", None),
    ("cache_batch", BATCH_AXES),
    ("cache_len", None),
)


def make_mesh(mesh_cfg: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh; one entry may be -1 (fill)."""
  devices = list(jax.devices() if devices is None else devices)
  errors.raise_if(configlib.mesh_shape_problems(mesh_cfg.shape))
  shape = list(mesh_cfg.shape)
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % rest:
      raise errors.ConfigError(
          f"mesh.shape {tuple(mesh_cfg.shape)}: {len(devices)} devices are not divisible by {rest}")
    shape[shape.index(-1)] = len(devices) // rest
  if int(np.prod(shape)) != len(devices):
    raise errors.ConfigError(
        f"mesh.shape {tuple(shape)} needs {int(np.prod(shape))} devices but {len(devices)} are "
        "available; set mesh.shape to match (one entry may be -1)")
  # Auto axis types: GSPMD propagates shardings from the constraints we place;
  # jax's default Explicit mode would reject linen's un-annotated ops.
  return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def mesh_axis_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return int(np.prod([mesh.shape[a] for a in axes]))


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways a batch is split: batch sizes must be multiples of this."""
  return mesh_axis_size(mesh, BATCH_AXES)


def check_model_fits_mesh(model_cfg: Any, mesh: Mesh) -> None:
  """Fails early, one line per problem, on head counts the mesh cannot split.

  The same check as configlib.problems', here with the mesh's real tensor size
  (the config may say -1). n_heads vs n_kv_heads is ModelConfig's own check.
  """
  errors.raise_if(configlib.tensor_axis_problems(model_cfg, mesh.shape["tensor"]))


def spec_for(mesh: Mesh, logical_axes: Sequence[str | None],
             shape: Sequence[int] | None = None) -> P:
  """Logical axes -> PartitionSpec under LOGICAL_RULES.

  A dimension whose size is not divisible by its mesh axes stays replicated
  (e.g. a 9-head model on tensor=2 never gets here: check_model_fits_mesh
  rejects it; a vocab of 49153 rows just stays unsplit).
  """
  rules = dict(LOGICAL_RULES)
  spec = []
  used: set[str] = set()
  for i, name in enumerate(logical_axes):
    axes = rules.get(name) if name is not None else None
    if axes is not None:
      flat = (axes,) if isinstance(axes, str) else tuple(axes)
      # A mesh axis may appear once per spec; size-1 axes are dropped as noise.
      flat = tuple(a for a in flat if a not in used and mesh.shape[a] > 1)
      if shape is not None and flat and shape[i] % mesh_axis_size(mesh, flat):
        flat = ()
      used.update(flat)
      axes = None if not flat else (flat[0] if len(flat) == 1 else flat)
    spec.append(axes)
  return P(*spec)


def sharding_for(mesh: Mesh, logical_axes: Sequence[str | None],
                 shape: Sequence[int] | None = None) -> NamedSharding:
  return NamedSharding(mesh, spec_for(mesh, logical_axes, shape))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading dim over the data axes, the rest replicated (token batches)."""
  return sharding_for(mesh, ("act_batch",) + (None,) * (ndim - 1))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_global(x: np.ndarray | jax.Array, sharding: NamedSharding) -> jax.Array:
  """Host array (the same on every process) -> global array with `sharding`.

  Each device takes its slice of `x`, so no process needs to hold another's
  devices' data; a jax.Array already placed with `sharding` is returned as is.
  """
  if isinstance(x, jax.Array):
    return x if x.sharding == sharding else jax.device_put(x, sharding)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def tree_shardings(mesh: Mesh, boxed_tree: Any) -> Any:
  """NamedShardings for a tree of nn.LogicallyPartitioned (or plain) leaves.

  Plain leaves (optimizer step counters, scalars) are replicated.
  """
  def one(x):
    if isinstance(x, nn.LogicallyPartitioned):
      return sharding_for(mesh, x.names, np.shape(x.value))
    return replicated(mesh)
  return jax.tree.map(one, boxed_tree,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def constrain(x: jax.Array, mesh: Mesh | None,
              logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names (no-op without a mesh)."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, sharding_for(mesh, logical_axes, x.shape))
