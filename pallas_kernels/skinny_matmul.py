"""Weight-streaming matmul for few rows: y[M, N] = x[M, K] @ w[K, N] with M <= 256.

A decode step multiplies a handful of rows by every weight of the model, so its GEMMs are a
stream of the weights from HBM; what matters is keeping enough bytes in flight on every SM.
The Mosaic GPU kernel computes the transposed product (the "swap AB" of skinny GEMMs):

  y^T[N, M] = w^T[N, K] @ x^T[K, M]

so the weights fill wgmma's 64-row side and the few rows of x its narrow side (M rounded up to 8),
and no tensor-core work is spent on padding rows. Program (n, s) of the grid owns `n_sub` tiles of
64 output features and the s-th of `splits` equal slices of K; it streams its slice in steps of
`tile_k` through a `stages`-deep ring of SMEM buffers (one TMA per 64 features of w and one of x
per step) and writes f32 partial sums [splits, N, MP]. `combine` adds the splits, drops the
padding rows and transposes: one small XLA fusion the consumer of y usually absorbs.

`reference` is the same plan in jnp (same split boundaries, f32 partials, same combine), so CPU
tests check the plan arithmetic the kernel relies on; GPU tests compare the kernel with it.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

WG_ROWS = 64          # wgmma tile height: 64 output features per accumulator
MAX_ROWS = 256        # wgmma's widest side: x rows per call (rounded up to 8)
MAX_SMEM_BYTES = 232448  # H100 / H200: shared memory a block may use (as Mosaic GPU reports)


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def padded_rows(m: int) -> int:
  return _cdiv(m, 8) * 8


@dataclasses.dataclass(frozen=True)
class GemmPlan:
  """How one call is tiled: tile_k (a multiple of 64), n_sub 64-feature tiles per program,
  splits of K (each a whole number of tile_k steps), ring stages."""
  tile_k: int = 128
  n_sub: int = 1
  splits: int = 1
  stages: int = 4

  @property
  def tile_n(self) -> int:
    return WG_ROWS * self.n_sub

  def check(self, m: int, k: int, n: int) -> None:
    """ValueError naming what does not fit: the kernel has no masking, so K, N and the splits
    must divide exactly."""
    if not 1 <= m <= MAX_ROWS:
      raise ValueError(f"skinny matmul takes 1 to {MAX_ROWS} rows, got {m}")
    if self.tile_k % 64 or not 64 <= self.tile_k <= 256:
      raise ValueError(f"tile_k must be 64, 128, 192 or 256, got {self.tile_k}")
    if n % self.tile_n:
      raise ValueError(f"N={n} is not a multiple of the {self.tile_n}-feature tile")
    if k % (self.tile_k * self.splits):
      raise ValueError(f"K={k} does not split into {self.splits} slices of whole {self.tile_k}-steps")
    if self.stages < 1:
      raise ValueError(f"stages must be >= 1, got {self.stages}")
    need = smem_bytes(self, m)
    if need > MAX_SMEM_BYTES:
      raise ValueError(f"plan {self} needs {need // 1024} KiB of shared memory for {m} rows, over "
                       f"{MAX_SMEM_BYTES // 1024} KiB: fewer stages or a smaller tile_k")

  def steps(self, k: int) -> int:
    """tile_k steps of one split."""
    return k // (self.tile_k * self.splits)


def smem_bytes(plan: GemmPlan, m: int, itemsize: int = 2) -> int:
  mp = padded_rows(m)
  ring = plan.stages * plan.tile_k * (plan.tile_n + mp) * itemsize
  out = plan.n_sub * WG_ROWS * mp * 4
  return max(ring, out) + 1024


def deepest_ring(plan: GemmPlan, m: int, max_stages: int = 8) -> GemmPlan:
  """plan with as many ring stages (up to max_stages) as shared memory holds for m rows."""
  stages = 1
  while stages < max_stages and smem_bytes(dataclasses.replace(plan, stages=stages + 1), m) <= MAX_SMEM_BYTES:
    stages += 1
  return dataclasses.replace(plan, stages=stages)


def choose_plan(m: int, k: int, n: int, *, num_sms: int = 132) -> GemmPlan:
  """A plan that keeps every SM streaming: enough programs (splitting K when N alone gives too
  few), and as deep a ring as shared memory holds."""
  mp = padded_rows(m)
  n_sub = 2 if mp <= 64 and n % 128 == 0 else 1
  tile_k = 128 if k % 128 == 0 else 64
  programs = n // (WG_ROWS * n_sub)
  splits = 1
  while programs * splits < num_sms and k % (tile_k * splits * 2) == 0 and splits < 8:
    splits *= 2
  return deepest_ring(GemmPlan(tile_k=tile_k, n_sub=n_sub, splits=splits, stages=1), m)


def combine(parts: jax.Array, m: int, dtype) -> jax.Array:
  """[splits, N, MP] f32 partials -> y [m, N] in dtype (f32: the sums as accumulated)."""
  return parts.sum(axis=0)[:, :m].T.astype(dtype)


def reference(x: jax.Array, w: jax.Array, plan: GemmPlan, out_dtype=None) -> jax.Array:
  """The kernel's plan in jnp: per-split f32 partials of the transposed product, then combine."""
  m, k = x.shape
  n = w.shape[1]
  plan.check(m, k, n)
  s = plan.splits
  xp = jnp.pad(x, ((0, padded_rows(m) - m), (0, 0))).astype(jnp.float32)  # half products are exact in f32
  parts = jnp.einsum("skn,msk->snm", w.astype(jnp.float32).reshape(s, k // s, n), xp.reshape(-1, s, k // s),
                     precision="highest")
  return combine(parts, m, out_dtype or x.dtype)


# ---------------------------------------------------------------------------------------------
# Mosaic GPU kernel (Hopper)

def _transpose(ref):
  from jax.experimental.pallas import mosaic_gpu as plgpu
  if hasattr(ref, "transpose"):
    return ref.transpose((1, 0))
  return plgpu.transpose_ref(ref, (1, 0))  # jax < 0.11


def _kernel(x_ref,    # [M, K] (GMEM)
            w_ref,    # [K, N] (GMEM)
            o_ref,    # [splits, N, MP] f32 (GMEM)
            *, plan: GemmPlan, mp: int, dtype):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  ni = lax.axis_index("n")
  si = lax.axis_index("s")
  tk, ns, st = plan.tile_k, plan.n_sub, plan.stages
  steps = plan.steps(x_ref.shape[1])
  k0 = si * (steps * tk)
  n0 = ni * plan.tile_n
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

  def ring(w_smem,   # [st, ns, tk, 64]
           x_smem,   # [st, MP, tk]
           bars):    # [st]
    def issue(j, slot):
      kk = k0 + j * tk
      for i in range(ns):
        plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(kk, tk), pl.ds(n0 + i * WG_ROWS, WG_ROWS)],
                                w_smem.at[slot, i], bars.at[slot])
      plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(0, mp), pl.ds(kk, tk)], x_smem.at[slot],
                              bars.at[slot])

    for j in range(min(st, steps)):
      issue(jnp.int32(j), j)

    def body(j, accs):
      slot = lax.rem(j, jnp.int32(st))
      plgpu.barrier_wait(bars.at[slot])

      def mma(acc_refs):
        for i in range(ns):
          plgpu.wgmma(acc_refs[i], _transpose(w_smem.at[slot, i]), _transpose(x_smem.at[slot]))
      accs = pl.run_state(mma)(tuple(plgpu.ACC.init(a) for a in accs))

      @pl.when(j + st < steps)
      def _refill():
        issue(j + st, slot)
      return accs

    acc0 = plgpu.layout_cast(jnp.zeros((WG_ROWS, mp), jnp.float32), plgpu.Layout.WGMMA)
    return lax.fori_loop(0, steps, body, tuple(acc0 for _ in range(ns)))

  accs = pl.run_scoped(
      ring,
      plgpu.SMEM((st, ns, tk, WG_ROWS), dtype, transforms=transforms),
      plgpu.SMEM((st, mp, tk), dtype, transforms=transforms),
      plgpu.Barrier(num_arrivals=ns + 1, num_barriers=st),
  )

  def write(o_smem):  # [ns, 64, MP] f32
    for i in range(ns):
      o_smem.at[i][...] = accs[i]
    plgpu.commit_smem()
    for i in range(ns):
      plgpu.copy_smem_to_gmem(o_smem.at[i], o_ref.at[si, pl.ds(n0 + i * WG_ROWS, WG_ROWS)])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(write, plgpu.SMEM((ns, WG_ROWS, mp), jnp.float32))


def skinny_matmul_mgpu(x: jax.Array, w: jax.Array, plan: GemmPlan | None = None, out_dtype=None) -> jax.Array:
  """y = x @ w on the tensor cores of a Hopper GPU (bf16 or f16 operands, f32 accumulation; the
  result in out_dtype, default x's)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu

  m, k = x.shape
  n = w.shape[1]
  plan = plan or choose_plan(m, k, n)
  plan.check(m, k, n)
  mp = padded_rows(m)
  if mp > m:  # a TMA box may not be larger than its array (the pad fuses into x's producer)
    x = jnp.pad(x, ((0, mp - m), (0, 0)))
  call = plgpu.kernel(
      functools.partial(_kernel, plan=plan, mp=mp, dtype=x.dtype),
      out_type=jax.ShapeDtypeStruct((plan.splits, n, mp), jnp.float32),
      grid=(n // plan.tile_n, plan.splits),
      grid_names=("n", "s"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      kernel_name=f"skinny_matmul_k{plan.tile_k}_n{plan.tile_n}_s{plan.splits}_st{plan.stages}",
  )
  return combine(call(x, w), m, out_dtype or x.dtype)


def supported(x_dtype, m: int, k: int, n: int) -> bool:
  """Whether the Mosaic kernel takes this call (with choose_plan's plan)."""
  if jnp.dtype(x_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return False
  if not 1 <= m <= MAX_ROWS or n % WG_ROWS or k % 64:
    return False
  try:
    choose_plan(m, k, n).check(m, k, n)
  except ValueError:
    return False
  return True


skinny_matmul_reference = reference
