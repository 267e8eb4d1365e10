"""Explicit sharding ("sharding in types"): the statistics under automatic axes.

Under ``jit`` with a batch sharded over a mesh whose axes are ``Explicit``
(the default of ``jax.make_mesh`` in recent JAX), every array carries its
sharding in its type and JAX checks each operation against it. The selection
engine slices the batch along the reduction axes (one entry per channel as a
pivot, a strided subsample for the cold start's spread), and JAX rejects a
slice of a sharded dimension whose length does not divide over the mesh
(``ShardingTypeError``). The statistics are therefore computed with those
mesh axes made automatic (``jax.sharding.auto_axes``): the partitioner then
places the slices itself, and the results, which depend on the global batch
only, are the same as on one device. Outputs are sharded as ``x``'s channel
dimensions are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import PartitionSpec


def explicit_mesh_axes(x: Any) -> tuple[str, ...]:
  """The ``Explicit`` mesh axes that ``x``'s sharding type names (or ())."""
  try:
    sharding = jax.typeof(x).sharding
    mesh = sharding.mesh
    explicit = set(mesh.explicit_axes)
    spec = sharding.spec
  except (AttributeError, TypeError):  # no sharding in types here
    return ()
  names: list[str] = []
  for entry in spec:
    for name in entry if isinstance(entry, tuple) else (entry,):
      if name is not None and name in explicit:
        names.append(name)
  return tuple(names)


def with_automatic_axes(
  fn: Callable[..., Any], x: Any, axes: tuple[int, ...], *args: Any
) -> Any:
  """``fn(x, *args)``; where ``x`` is sharded over explicit mesh axes, run
  under ``auto_axes`` with every per-channel output sharded like ``x``'s
  channel dimensions (anything else replicated)."""
  if not explicit_mesh_axes(x):
    return fn(x, *args)
  spec = tuple(jax.typeof(x).sharding.spec)
  spec = spec + (None,) * (x.ndim - len(spec))
  channel_shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
  channel_spec = PartitionSpec(
    *(s for i, s in enumerate(spec) if i not in axes)
  )
  # Output shapes from unsharded stand-ins (tracing fn on x itself would
  # hit the very check that this function avoids).
  out_shapes = jax.eval_shape(
    fn,
    *jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (x, *args)),
  )
  out_sharding = jax.tree.map(
    lambda s: (
      channel_spec if tuple(s.shape) == channel_shape else PartitionSpec()
    ),
    out_shapes,
  )
  return jax.sharding.auto_axes(fn, out_sharding=out_sharding)(x, *args)
