"""Mesh code, apart from the model: the `tp` axis, PartitionSpecs, and shard_map wrappers."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

AXIS = "tp"


class ShardingError(ValueError):
  """A mesh request this machine cannot serve (a user error)."""


def make_mesh(tp="1") -> Mesh:
  """A 1-D mesh over the first `tp` local devices ("all" = every local device)."""
  devices = jax.local_devices()
  if str(tp) == "all":
    n = len(devices)
  else:
    try:
      n = int(tp)
    except ValueError:
      raise ShardingError(f"--tp must be a positive integer or 'all', got {tp!r}") from None
  if n < 1:
    raise ShardingError(f"--tp must be >= 1, got {n}")
  if n > len(devices):
    raise ShardingError(f"--tp {n} needs {n} devices but only {len(devices)} {jax.default_backend()} device(s) "
                        "are present (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N)")
  return Mesh(np.array(devices[:n]), (AXIS,))
