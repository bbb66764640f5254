"""Pallas kernels of the KV-RM runtime: paged decode attention, block copy and a skinny GEMM.

The names below load their module on first use (PEP 562), so that the host half can import the
plain-Python `pallas_kernels.runs` without JAX.
"""

import importlib

_EXPORTS = {
    "copy_blocks": "block_copy", "copy_blocks_reference": "block_copy",
    "paged_decode_attention": "paged_attention", "paged_decode_attention_reference": "paged_attention",
    "KVPartition": "partition", "build_descriptors": "partition", "make_transfer_groups": "partition",
    "coalesce_runs": "runs",
    "skinny_matmul_mgpu": "skinny_matmul", "skinny_matmul_reference": "skinny_matmul",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'pallas_kernels' has no attribute {name!r}")
  return getattr(importlib.import_module(f"pallas_kernels.{_EXPORTS[name]}"), name)
