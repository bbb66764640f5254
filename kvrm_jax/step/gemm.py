"""The steps' projection GEMMs: XLA's dot, or the weight-streaming Mosaic GPU kernel for few rows.

A decode step (and a mixed step's decode-sized buckets) multiplies at most a few hundred rows by
every weight of the model: the GEMMs stream the weights from HBM, and how close they come to the
copy bandwidth sets the step time. RuntimeConfig.matmul picks who runs them:

  "xla"    XLA's dot everywhere (its Triton or cuBLAS GEMMs on GPU); the default: on an H100 it
           beat the kernel below at most shapes and row counts (docs/step.md, "GEMMs at decode
           row counts");
  "skinny" pallas_kernels.skinny_matmul (Hopper, bf16/f16) for every projection and the LM head
           with at most 256 rows whose shape it takes; XLA's dot for the rest.

The choice is made per call at trace time from static shapes: each compiled step holds one
kernel per projection shape, never a branch at run time.
"""

from __future__ import annotations

import jax

from kvrm_jax.config import RuntimeConfig
from kvrm_jax.model.llama import dot as xla_matmul


def kernel_available() -> bool:
  """Whether this process runs on a Hopper GPU (the kernel's wgmma and TMA copies are sm_90's)."""
  if jax.default_backend() != "gpu":
    return False
  dev = jax.devices()[0]
  cc = getattr(dev, "compute_capability", None)
  if cc is not None:
    return str(cc).split(".")[0] == "9"
  return any(s in dev.device_kind for s in ("H100", "H200", "H800", "H20"))


def check(rt: RuntimeConfig) -> None:
  """ValueError, one line, for matmul='skinny' where the kernel cannot run."""
  if rt.matmul == "skinny" and not kernel_available():
    dev = jax.devices()[0]
    where = dev.platform if dev.device_kind.lower() == dev.platform else f"{dev.platform} ({dev.device_kind})"
    raise ValueError(f"matmul 'skinny' runs a Mosaic GPU kernel that needs a Hopper GPU (H100 / H200); this "
                     f"process runs on {where}: use matmul 'xla'")


def skinny_matmul(x, w, out_dtype=None):
  """x [T, K] @ w [K, N] through the Mosaic kernel where it takes the shape (T <= 256, half
  types, K and N multiples of 64), else XLA's dot."""
  from pallas_kernels import skinny_matmul as sm
  m, k = x.shape
  if w.dtype == x.dtype and sm.supported(x.dtype, m, k, w.shape[1]):
    return sm.skinny_matmul_mgpu(x, w, out_dtype=out_dtype)
  return xla_matmul(x, w, out_dtype)


def projection_matmul(rt: RuntimeConfig):
  """The model's `matmul` argument for this runtime (kvrm_jax/model/llama.py)."""
  return skinny_matmul if rt.matmul == "skinny" else xla_matmul
