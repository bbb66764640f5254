"""CUPTI kernel timings through the jax CUDA plugin's Mosaic GPU extension (the mechanism of
scripts/bench_kernels.py's `Timer`), for the bench scripts."""

from __future__ import annotations


def cupti_ext():
  """The extension with `_cupti_init()` / `_cupti_get_timings(finalize)`, or None (no CUDA plugin)."""
  try:  # imported here: the extension only exists with the jax CUDA plugin, absent on CPU
    from jax._src.lib import mosaic_gpu as mosaic_gpu_lib
    return mosaic_gpu_lib._mosaic_gpu_ext
  except Exception:  # noqa: BLE001
    return None


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
