"""CUPTI kernel timings through the jax CUDA plugin's Mosaic GPU extension (the mechanism of
scripts/bench_kernels.py's `Timer`), for the bench scripts."""

from __future__ import annotations

try:  # the extension exists only with the jax CUDA plugin
  from jax._src.lib import mosaic_gpu as _mosaic_gpu_lib
except Exception:  # noqa: BLE001
  _mosaic_gpu_lib = None


def cupti_ext():
  """The extension with `_cupti_init()` / `_cupti_get_timings(finalize)`, or None (no CUDA plugin)."""
  return getattr(_mosaic_gpu_lib, "_mosaic_gpu_ext", None)


def kernel_timings(run):
  """Runs `run()` (which must block until its device work is done) under CUPTI.

  Returns (run's result, [(kernel name, ms), ...] in launch order); raises RuntimeError when CUPTI
  is not available (no jax CUDA plugin).
  """
  ext = cupti_ext()
  if ext is None:
    raise RuntimeError("no CUPTI (the jax CUDA plugin's Mosaic GPU extension is not importable)")
  ext._cupti_init()
  try:
    out = run()
  finally:
    timings = ext._cupti_get_timings(True)
  return out, [(str(n), float(t)) for n, t in (timings or [])]
