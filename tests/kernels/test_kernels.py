# Paged decode attention and block copy against a float64 numpy oracle.
# CPU: the pure-jnp reference and the generic Pallas kernel in interpret mode.
# GPU (marked `gpu`, skipped elsewhere): Mosaic GPU and Triton kernels, the
# Mosaic block copy.
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import block_copy, partition
from pallas_kernels.paged_attention import (paged_decode_attention,
                                            paged_decode_attention_reference, resolve_tile)
from pallas_kernels.partition import KVPartition, make_transfer_groups

ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU (on a GPU machine: make test-gpu)")
TOL = {np.float32: 1e-5, jnp.bfloat16: 1e-2}
MAX_GROUPS = 3


def _cdiv(a, b):
  return -(-a // b)


@pytest.fixture(autouse=True)
def exact_float32(request):
  """The kernels run as inside a float32 engine step: exact float32 dots (outside a step, GPUs
  default to TF32: 2.3-3.6e-4 from the float64 oracle on an H200). The Mosaic GPU tests (bf16/f16
  kernels) keep the backend's default."""
  if request.node.get_closest_marker("gpu"):
    yield
    return
  with jax.default_matmul_precision("highest"):
    yield


def make_case(seed, *, bs, ratio, head_dim, layout, dtype, kv_heads=2, max_blocks=7,
              lengths=None, extra_free=5):
  """Random pool + block tables; every byte no live token owns is poisoned."""
  rng = np.random.default_rng(seed)
  if lengths is None:
    full = max_blocks * bs
    lengths = [0, 1, bs + bs // 2 + 1, full, int(rng.integers(2, full))]  # inactive, 1, mid-block, full
  lengths = np.asarray(lengths, np.int32)
  B = len(lengths)
  nblk = [_cdiv(int(n), bs) for n in lengths]
  N = 1 + B * max_blocks + extra_free  # fixed per shape: one compile per (bs, ratio, D)
  free = list(range(1, N))
  bt = np.zeros((B, max_blocks), np.int32)
  if layout == "contiguous":    # one run per sequence, sequences in random order
    start = 1
    for b in rng.permutation(B):
      bt[b, :nblk[b]] = np.arange(start, start + nblk[b])
      start += nblk[b]
  elif layout in ("permuted", "fragmented"):  # random block order
    perm = rng.permutation(free)
    off = 0
    for b in range(B):
      bt[b, :nblk[b]] = perm[off:off + nblk[b]]
      off += nblk[b]
  elif layout == "runs":        # runs of 1-4 blocks: some chunks contiguous, some not
    perm = list(rng.permutation(free))
    for b in range(B):
      j = 0
      while j < nblk[b]:
        run = min(int(rng.integers(1, 5)), nblk[b] - j)
        # find `run` consecutive free ids
        starts = [p for p in perm if all((p + t) in perm for t in range(run))]
        p0 = starts[int(rng.integers(len(starts)))] if starts else perm[0]
        run = run if starts else 1
        for t in range(run):
          bt[b, j + t] = p0 + t
          perm.remove(p0 + t)
        j += run
  else:
    raise ValueError(layout)
  groups, num_groups = make_transfer_groups(bt, lengths, bs, MAX_GROUPS)
  if layout == "fragmented":
    num_groups[:] = 0
  hq = kv_heads * ratio
  q = rng.standard_normal((B, hq, head_dim)).astype(np.float32)
  k = rng.standard_normal((kv_heads, N, bs, head_dim)).astype(np.float32)
  v = rng.standard_normal((kv_heads, N, bs, head_dim)).astype(np.float32)
  live = np.zeros((N, bs), bool)
  for b in range(B):
    for t in range(int(lengths[b])):
      live[bt[b, t // bs], t % bs] = True
  poison_k = np.where(rng.random((N, bs)) < 0.5, np.nan, 3e38).astype(np.float32)
  poison_v = np.where(rng.random((N, bs)) < 0.5, np.nan, -np.inf).astype(np.float32)
  k = np.where(live[None, :, :, None], k, poison_k[None, :, :, None])
  v = np.where(live[None, :, :, None], v, poison_v[None, :, :, None])
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
  return dict(q=q, k_pool=k, v_pool=v, lengths=jnp.asarray(lengths), block_tables=jnp.asarray(bt),
              groups=jnp.asarray(groups), num_groups=jnp.asarray(num_groups))


def oracle(c, sm_scale=None):
  """float64 numpy decode attention over the live tokens only."""
  q, k, v = (np.asarray(c[n]).astype(np.float64) for n in ("q", "k_pool", "v_pool"))
  lengths, bt = np.asarray(c["lengths"]), np.asarray(c["block_tables"])
  B, hq, D = q.shape
  hkv, _, bs, _ = k.shape
  g = hq // hkv
  scale = 1 / math.sqrt(D) if sm_scale is None else sm_scale
  out = np.zeros((B, hq, D))
  for b in range(B):
    n = int(lengths[b])
    if n == 0:
      continue
    blocks = bt[b, :_cdiv(n, bs)]
    kk = k[:, blocks].reshape(hkv, -1, D)[:, :n]
    vv = v[:, blocks].reshape(hkv, -1, D)[:, :n]
    for h in range(hq):
      s = kk[h // g] @ q[b, h] * scale
      p = np.exp(s - s.max())
      out[b, h] = (p / p.sum()) @ vv[h // g]
  return out


def check(out, c, dtype, sm_scale=None):
  ref = oracle(c, sm_scale)
  out = np.asarray(out).astype(np.float64)
  assert out.shape == ref.shape
  assert np.all(np.isfinite(out)), "non-finite output (poison leaked)"
  inactive = np.asarray(c["lengths"]) == 0
  assert np.all(out[inactive] == 0), "inactive slot must give zeros"
  err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  assert err <= TOL[dtype], f"rel error {err:.3g} > {TOL[dtype]}"


def attn_args(c):
  return (c["q"], c["k_pool"], c["v_pool"], c["lengths"], c["block_tables"], c["groups"],
          c["num_groups"])


# ----------------------------------------------------------------------------- partition


def test_chunk_sources_matches_brute_force():
  rng = np.random.default_rng(0)
  for trial in range(20):
    bs, cb = 8, int(rng.integers(1, 5))
    c = make_case(trial, bs=bs, ratio=1, head_dim=8, layout=["contiguous", "runs", "permuted"][trial % 3],
                  dtype=np.float32, max_blocks=9)
    part = KVPartition.choose(batch=5, kv_heads=1, block_size=bs, max_blocks=9,
                              chunk_tokens=cb * bs, num_splits=int(rng.integers(1, 4)))
    got = np.asarray(partition.chunk_sources(c["groups"], c["num_groups"], part))
    bt, ng, lengths = (np.asarray(c[n]) for n in ("block_tables", "num_groups", "lengths"))
    for b in range(bt.shape[0]):
      nblk = _cdiv(int(lengths[b]), bs)
      for ch in range(part.padded_chunks):
        lo = ch * cb
        ids = bt[b, lo:lo + cb]
        inside = (ng[b] > 0 and lo + cb <= nblk and len(ids) == cb
                  and np.all(np.diff(ids) == 1))
        # Contiguous ids inside one run are exactly "inside one group".
        want = int(ids[0]) if inside else -1
        assert got[b, ch] == want, (trial, b, ch, ids, got[b], ng[b])


def test_table_chunk_source_finds_every_group_chunk_and_contiguous_tails():
  """The Mosaic kernel's in-kernel plan (partition.table_chunk_source over its split's slice of
  the block-table row): every chunk the transfer groups cover, the same start; any other chunk
  one copy only when its valid blocks are consecutive and the copy stays inside the pool."""
  rng = np.random.default_rng(1)
  for trial in range(20):
    bs, cb, mb = 8, int(rng.integers(1, 5)), 9
    c = make_case(trial, bs=bs, ratio=1, head_dim=8, layout=["contiguous", "runs", "permuted"][trial % 3],
                  dtype=np.float32, max_blocks=mb)
    part = KVPartition.choose(batch=5, kv_heads=1, block_size=bs, max_blocks=mb,
                              chunk_tokens=cb * bs, num_splits=int(rng.integers(1, 4)))
    groups_src = np.asarray(partition.chunk_sources(c["groups"], c["num_groups"], part))
    bt, lengths = np.asarray(c["block_tables"]), np.asarray(c["lengths"])
    pool = c["k_pool"].shape[1]
    cps = part.chunks_per_split
    for b in range(bt.shape[0]):
      nblk = _cdiv(int(lengths[b]), bs)
      for s in range(part.num_splits):
        row = np.zeros(cps * cb, np.int32)  # the split's slice, zeros past the row (TMA fill)
        got_ids = bt[b, s * cps * cb:(s + 1) * cps * cb]
        row[:len(got_ids)] = got_ids
        nvalid = jnp.int32(nblk - s * cps * cb)
        for i in range(cps):
          ch = s * cps + i
          if ch * cb >= nblk:
            continue  # no valid token: the kernel never plans it
          got = int(partition.table_chunk_source(lambda k: jnp.int32(row[k]), jnp.int32(i), cb,
                                                 nvalid, pool))
          valid = row[i * cb:i * cb + min(cb, nblk - ch * cb)]
          want = (int(valid[0]) if np.all(np.diff(valid) == 1) and valid[0] + cb <= pool
                  else -1)
          assert got == want, (trial, b, ch, valid, got)
          if groups_src[b, ch] >= 0:
            assert got == groups_src[b, ch], (trial, b, ch)

@pytest.mark.parametrize("batch,kv_heads,max_blocks,chunk_tokens",
                         [(1, 1, 1, 128), (8, 8, 32, 128), (256, 8, 512, 128), (3, 3, 100, 64)])
def test_partition_covers_every_block_once(batch, kv_heads, max_blocks, chunk_tokens):
  for bs in (8, 16, 32):
    p = KVPartition.choose(batch=batch, kv_heads=kv_heads, block_size=bs, max_blocks=max_blocks,
                           chunk_tokens=chunk_tokens)
    assert p.padded_chunks * p.chunk_blocks >= max_blocks
    assert (p.num_splits - 1) * p.chunks_per_split < p.num_chunks  # no empty split
    assert p.desc_width >= 1 + p.chunks_per_split * (1 + p.chunk_blocks)
    assert p.desc_width % 32 == 0


# ----------------------------------------------------------------------------- attention

REF_CASES = list(itertools.product((8, 16, 32), (1, 3, 4, 8), (64, 128)))


@pytest.mark.parametrize("bs,ratio,head_dim", REF_CASES)
def test_reference_matches_oracle(bs, ratio, head_dim):
  for layout, dtype in (("contiguous", np.float32), ("permuted", jnp.bfloat16)):
    c = make_case(bs * 100 + ratio * 10 + head_dim, bs=bs, ratio=ratio, head_dim=head_dim,
                  layout=layout, dtype=dtype, max_blocks=5)
    out = paged_decode_attention_reference(c["q"], c["k_pool"], c["v_pool"], c["lengths"],
                                           c["block_tables"])
    check(out, c, dtype)


# (bs, ratio, head_dim, layout, dtype, chunk_tokens, num_splits, streams): every bs, ratio,
# head dim and layout at least once, both dtypes, one and several splits, one and several
# streams per program (the Mosaic kernel's warpgroups, each taking every streams-th chunk).
INTERPRET_CASES = [
    (8, 1, 64, "contiguous", np.float32, 16, 2, 1),
    (8, 8, 128, "runs", jnp.bfloat16, 32, 2, 1),
    (16, 3, 64, "permuted", np.float32, 32, 1, 3),
    (16, 4, 128, "runs", np.float32, 32, 2, 1),
    (16, 4, 64, "fragmented", jnp.bfloat16, 64, 1, 1),
    (32, 3, 128, "contiguous", jnp.bfloat16, 64, 2, 2),
    (32, 8, 64, "permuted", jnp.bfloat16, 32, 3, 1),
    (8, 3, 64, "runs", jnp.bfloat16, 8, 4, 2),
    (16, 8, 64, "fragmented", np.float32, 16, 1, 4),
]


@pytest.mark.parametrize("bs,ratio,head_dim,layout,dtype,chunk_tokens,num_splits,streams",
                         INTERPRET_CASES)
def test_interpret_kernel_matches_oracle(bs, ratio, head_dim, layout, dtype, chunk_tokens,
                                         num_splits, streams):
  c = make_case(bs + ratio + head_dim, bs=bs, ratio=ratio, head_dim=head_dim, layout=layout,
                dtype=dtype)
  out = paged_decode_attention(*attn_args(c), backend="interpret", chunk_tokens=chunk_tokens,
                               num_splits=num_splits, streams=streams)
  assert out.dtype == c["q"].dtype
  check(out, c, dtype)


def test_stream_chunks_deal_every_chunk_once():
  for n in range(0, 12):
    for ns in (1, 2, 3, 4):
      part = KVPartition(block_size=8, max_blocks=12, chunk_blocks=1, num_splits=1, streams=ns)
      owned = sorted(w + j * ns for w in range(ns) for j in range(part.stream_chunks(n, w)))
      assert owned == list(range(n)), (n, ns)
      traced = [int(part.stream_chunks(jnp.int32(n), jnp.int32(w))) for w in range(ns)]
      assert traced == [part.stream_chunks(n, w) for w in range(ns)]
  # more streams than chunks per split: capped
  assert KVPartition.choose(batch=1, kv_heads=1, block_size=16, max_blocks=4, chunk_tokens=64,
                            num_splits=1, streams=4).streams == 1


def test_merge_lse_matches_joint_softmax():
  rng = np.random.default_rng(3)
  s = rng.standard_normal((3, 40)) * 4             # [rows, keys] scores (base 2)
  v = rng.standard_normal((40, 6))
  keep = np.ones((3, 40), bool)
  parts = np.array_split(np.arange(40), 5)
  keep[0, parts[1]] = False                        # part 1 is empty for row 0
  os, lses = [], []
  for idx in parts:
    p = np.where(keep[:, idx], np.exp2(s[:, idx]), 0.0)
    den = p.sum(-1, keepdims=True)
    os.append(jnp.asarray(np.where(den > 0, p / np.where(den > 0, den, 1), 0) @ v[idx], jnp.float32))
    with np.errstate(divide="ignore"):
      lses.append(jnp.asarray(np.log2(den[:, 0]), jnp.float32))  # -inf where empty
  o, lse = partition.merge_lse(os, lses)
  p = np.where(keep, np.exp2(s), 0.0)
  np.testing.assert_allclose(np.asarray(o), (p / p.sum(-1, keepdims=True)) @ v, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(lse), np.log2(p.sum(-1)), rtol=1e-5)
  o, lse = partition.merge_lse([jnp.zeros((2, 4))] * 2, [jnp.full((2,), -jnp.inf)] * 2)
  assert np.all(np.asarray(o) == 0) and np.all(np.asarray(lse) == -np.inf)


def test_gather_only_variant_matches_oracle():
  # The Triton path's single-gather form of the same chunk plan, run in interpret mode.
  from pallas_kernels import paged_attention as pa
  c = make_case(9, bs=16, ratio=4, head_dim=64, layout="runs", dtype=np.float32)
  part = KVPartition.choose(batch=5, kv_heads=2, block_size=16, max_blocks=7, chunk_tokens=32,
                            num_splits=2)
  desc = partition.build_descriptors(c["lengths"], c["block_tables"], c["groups"],
                                     c["num_groups"], part)
  q4 = jnp.pad(c["q"].reshape(5, 2, 4, 64), ((0, 0), (0, 0), (0, 12), (0, 0)))
  base = jnp.zeros((partition.DESC_COLS,), jnp.int32)
  o, lse = pa._generic_call(desc, base, q4, c["k_pool"], c["v_pool"], part=part, sm_scale=1 / 8,
                            interpret=True, gather_only=True)
  out = partition.combine_splits(o, lse)[0][:, :, :4].reshape(5, 8, 64)
  check(out, c, np.float32)


def stack_layers(c, layer, num_layers=3):
  """The case's pool as layer `layer` of a [Hkv, num_layers * N, bs, D] pool (other layers NaN)."""
  k, v = c["k_pool"], c["v_pool"]
  n = k.shape[1]
  nan = jnp.full_like(k, jnp.nan)
  kl = jnp.concatenate([k if i == layer else nan for i in range(num_layers)], axis=1)
  vl = jnp.concatenate([v if i == layer else nan for i in range(num_layers)], axis=1)
  return kl, vl, layer * n


@pytest.mark.parametrize("backend", ["interpret", "reference", pytest.param("mosaic", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("layout,splits,streams", [("runs", 2, 1), ("fragmented", 2, 1),
                                                   ("runs", 1, 2)])
def test_block_offset_and_shared_descriptors(backend, layout, splits, streams):
  """One descriptor built by decode_descriptors() serves calls on every layer of a pool of all layers;
  block_offset picks the layer inside the kernel (the other layers hold NaN)."""
  from pallas_kernels.paged_attention import decode_descriptors
  dtype = jnp.bfloat16 if backend == "mosaic" else np.float32
  c = make_case(11, bs=8, ratio=3, head_dim=64, layout=layout, dtype=dtype, max_blocks=24)
  # 3 chunks of 8 blocks over 2 splits, or over the 2 streams of one program
  tile = dict(backend=backend, chunk_tokens=64, num_splits=splits, streams=streams)
  args = (c["lengths"], c["block_tables"], c["groups"], c["num_groups"])
  kl, _, _ = stack_layers(c, 0)
  desc = decode_descriptors(jax.ShapeDtypeStruct(c["q"].shape, c["q"].dtype), kl, *args, **tile)
  assert (desc is None) == (backend == "reference")
  descs = [desc]
  if backend == "mosaic":  # and with no descriptor: the kernel plans from the block table itself
    descs.append(None)
  for desc, layer in itertools.product(descs, (0, 2)):
    kl, vl, off = stack_layers(c, layer)
    out = paged_decode_attention(c["q"], kl, vl, *args, block_offset=off, desc=desc, **tile)
    check(out, c, dtype)
    # a traced offset (the layer index of a lax.scan) reads the same layer
    traced = jax.jit(lambda o, kl=kl, vl=vl, desc=desc: paged_decode_attention(
        c["q"], kl, vl, *args, block_offset=o, desc=desc, **tile))
    check(traced(jnp.int32(off)), c, dtype)


@pytest.mark.parametrize("backend", ["interpret", pytest.param("mosaic", marks=pytest.mark.gpu)])
def test_return_lse_matches_reference(backend):
  """The log-sum-exp returned for merging further keys (summaries): split combine and one-split
  (the Mosaic kernel's own rows) paths against the pure-jnp reference."""
  dtype = jnp.bfloat16 if backend == "mosaic" else np.float32
  c = make_case(14, bs=8, ratio=3, head_dim=64, layout="runs", dtype=dtype, max_blocks=24)
  want_o, want_lse = paged_decode_attention_reference(*attn_args(c)[:5], return_lse=True)
  for splits, streams in ((2, 1), (1, 2), (1, 1)):
    o, lse = paged_decode_attention(*attn_args(c), backend=backend, chunk_tokens=64,
                                    num_splits=splits, streams=streams, return_lse=True)
    check(o, c, dtype)
    lse, want = np.asarray(lse), np.asarray(want_lse)
    assert lse.shape == want.shape and lse.dtype == np.float32
    assert np.array_equal(np.isneginf(lse), np.isneginf(want))  # the inactive slot
    live = np.isfinite(want)
    np.testing.assert_allclose(lse[live], want[live], rtol=0, atol=TOL[dtype] * 2)


def test_mosaic_refuses_chunks_under_64_tokens():
  from pallas_kernels import paged_attention_mgpu as mgpu
  from pallas_kernels.paged_attention import decode_descriptors
  if not mgpu.mgpu_supported(jnp.bfloat16, 64, 2, 8):
    pytest.skip("this jax lacks Mosaic GPU predicated copies (jax < 0.11): the mosaic path falls back")
  c = make_case(13, bs=8, ratio=2, head_dim=64, layout="runs", dtype=jnp.bfloat16)
  q = jax.ShapeDtypeStruct(c["q"].shape, c["q"].dtype)
  with pytest.raises(ValueError, match="multiple of 64 tokens"):
    decode_descriptors(q, c["k_pool"], c["lengths"], c["block_tables"], c["groups"], c["num_groups"],
                       backend="mosaic", chunk_tokens=16)


@pytest.mark.parametrize("B,Hkv,D,L,want", [
    (8, 3, 64, 512, (None, 1, 128)),      # 24 programs: KV splits (chosen by KVPartition)
    (8, 8, 128, 512, (4, 1, 64)),         # 64 programs: 4 splits of 64-token chunks
    (16, 3, 64, 2048, (4, 1, 64)),        # 48 programs
    (12, 8, 128, 2048, (1, 2, 64)),       # 96 programs: one split, two warpgroups (at d=128
    (32, 3, 64, 512, (1, 2, 128)),        # only 64-token chunks fit twice)
    (8, 8, 128, 8192, (None, 1, 128)),    # 64 programs, long context: splits
    (64, 3, 64, 2048, (1, 1, 128)),       # 192 programs: one split
    (256, 8, 256, 512, (1, 1, 64)),       # d=256: 128-token chunks would not fit
])
def test_mosaic_default_tile(B, Hkv, D, L, want):
  from pallas_kernels import paged_attention_mgpu as mgpu
  from pallas_kernels.paged_attention import _mosaic_tile
  got = _mosaic_tile(B, Hkv, D, 16, L // 16, None, None, None)
  assert got == want
  part = KVPartition.choose(batch=B, kv_heads=Hkv, block_size=16, max_blocks=L // 16,
                            chunk_tokens=got[2], num_splits=got[0], streams=got[1])
  mgpu.check_smem(part, D, stages=2)  # the default always fits
  assert _mosaic_tile(B, Hkv, D, 16, L // 16, 64, 3, 1) == (3, 1, 64)  # given args are kept


def test_resolve_tile_reports_backend_and_partition():
  c = make_case(3, bs=16, ratio=3, head_dim=64, layout="runs", dtype=np.float32, max_blocks=24)
  backend, part = resolve_tile(c["q"], c["k_pool"], c["block_tables"], backend="interpret",
                               chunk_tokens=64, num_splits=2)
  assert backend == "interpret" and (part.chunk_tokens, part.num_splits) == (64, 2)
  assert resolve_tile(c["q"], c["k_pool"], c["block_tables"], backend="reference") == ("reference", None)


def test_mosaic_tile_over_shared_memory_is_refused():
  from pallas_kernels import paged_attention_mgpu as mgpu
  big = KVPartition.choose(batch=8, kv_heads=8, block_size=16, max_blocks=32, chunk_tokens=128,
                           num_splits=1, streams=2)
  with pytest.raises(ValueError, match="shared memory.*streams=2"):
    mgpu.check_smem(big, 128, stages=2)   # 2 x 2 x 128 x 128 x bf16 K and V: 256 KiB of ring
  mgpu.check_smem(big, 64, stages=2)      # half the head dim fits


def test_descriptor_of_another_configuration_is_refused():
  from pallas_kernels.paged_attention import decode_descriptors
  c = make_case(12, bs=8, ratio=2, head_dim=64, layout="runs", dtype=np.float32)
  args = (c["lengths"], c["block_tables"], c["groups"], c["num_groups"])
  desc = decode_descriptors(c["q"], c["k_pool"], *args, backend="interpret", chunk_tokens=16, num_splits=1)
  with pytest.raises(ValueError, match="not built for this configuration"):
    paged_decode_attention(c["q"], c["k_pool"], c["v_pool"], *args, desc=desc, backend="interpret",
                           chunk_tokens=16, num_splits=2)


def test_layouts_exercise_both_copy_paths():
  c = make_case(3, bs=8, ratio=1, head_dim=8, layout="runs", dtype=np.float32, max_blocks=12)
  part = KVPartition.choose(batch=5, kv_heads=1, block_size=8, max_blocks=12, chunk_tokens=16)
  src = np.asarray(partition.chunk_sources(c["groups"], c["num_groups"], part))
  assert (src >= 0).any() and (src < 0).any()


def test_poison_does_not_change_output():
  kw = dict(bs=16, ratio=4, head_dim=64, layout="runs", dtype=np.float32)
  a, b = make_case(11, **kw), make_case(11, **kw)
  live = ~np.isnan(np.asarray(a["k_pool"])) & (np.abs(np.asarray(a["k_pool"])) < 1e30)
  b["k_pool"] = jnp.where(live, b["k_pool"], 7.0)
  b["v_pool"] = jnp.where(live, b["v_pool"], 1e4)
  for backend in ("reference", "interpret"):
    oa = paged_decode_attention(*attn_args(a), backend=backend, chunk_tokens=32, num_splits=2)
    ob = paged_decode_attention(*attn_args(b), backend=backend, chunk_tokens=32, num_splits=2)
    np.testing.assert_array_equal(np.asarray(oa), np.asarray(ob))


def test_sm_scale_and_auto_backend():
  c = make_case(5, bs=8, ratio=2, head_dim=64, layout="permuted", dtype=np.float32)
  check(paged_decode_attention(*attn_args(c), sm_scale=0.3), c, np.float32, sm_scale=0.3)
  check(paged_decode_attention(*attn_args(c), interpret=True, sm_scale=0.3, chunk_tokens=16), c,
        np.float32, sm_scale=0.3)


def test_bad_arguments_raise():
  c = make_case(1, bs=8, ratio=2, head_dim=64, layout="contiguous", dtype=np.float32)
  args = list(attn_args(c))
  bad = {
      "rank": (0, c["q"][0]),
      "gqa": (0, jnp.zeros((5, 3, 64), jnp.float32)),
      "head dim": (0, jnp.zeros((5, 4, 32), jnp.float32)),
      "dtype": (1, c["k_pool"].astype(jnp.bfloat16)),
      "lengths": (3, c["lengths"].astype(jnp.float32)),
  }
  for what, (i, x) in bad.items():
    a = list(args)
    a[i] = x
    with pytest.raises(ValueError):
      paged_decode_attention(*a)
    if i < 5:
      with pytest.raises(ValueError):
        paged_decode_attention_reference(*a[:5])
  with pytest.raises(ValueError):
    paged_decode_attention(*args, backend="cuda")


# ----------------------------------------------------------------------------- block copy


def _copy_case(seed, L=2, hkv=3, N=12, bs=8, D=64, dtype=np.float32):
  rng = np.random.default_rng(seed)
  k = rng.standard_normal((L, hkv, N, bs, D)).astype(np.float32)
  v = rng.standard_normal((L, hkv, N, bs, D)).astype(np.float32)
  ids = rng.permutation(np.arange(1, N))
  moves = np.zeros((6, 2), np.int32)          # 4 real moves + 2 padding rows
  moves[:4, 0], moves[:4, 1] = ids[:4], ids[4:8]
  want_k, want_v = k.copy(), v.copy()
  want_k[:, :, moves[:4, 1]] = k[:, :, moves[:4, 0]]
  want_v[:, :, moves[:4, 1]] = v[:, :, moves[:4, 0]]
  return (jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(moves),
          want_k.astype(dtype), want_v.astype(dtype))


def test_copy_blocks_reference_and_public():
  k, v, moves, want_k, want_v = _copy_case(0)
  nk, nv = block_copy.copy_blocks_reference(k, v, moves)
  np.testing.assert_array_equal(np.asarray(nk), want_k)
  np.testing.assert_array_equal(np.asarray(nv), want_v)
  nk, nv = block_copy.copy_blocks(k, v, moves)  # donates k, v
  np.testing.assert_array_equal(np.asarray(nk), want_k)
  np.testing.assert_array_equal(np.asarray(nv), want_v)
  with pytest.raises(ValueError):
    block_copy.copy_blocks_reference(nk, nv, moves.astype(jnp.float32))


# ----------------------------------------------------------------------------- GPU

LAYOUTS = ("contiguous", "runs", "fragmented")
GPU_CASES = list(itertools.product((8, 16, 32), (1, 3, 4, 8), (64, 128), LAYOUTS))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["mosaic", "triton"])
@pytest.mark.parametrize("block_size", (8, 16, 32))  # a third of the cases each: spread over the test workers
def test_gpu_kernel_matches_oracle(backend, block_size):
  failures = []
  for i, (bs, ratio, head_dim, layout) in enumerate(GPU_CASES):
    if bs != block_size:
      continue
    if backend == "triton" and i % 6:
      continue  # fallback path (slow Triton compiles): a sixth of the product
    c = make_case(i, bs=bs, ratio=ratio, head_dim=head_dim, layout=layout, dtype=jnp.bfloat16,
                  max_blocks=24, kv_heads=2)
    # (chunk_tokens, num_splits, stages, streams): split partials + combine, or one program per
    # (sequence, kv head) writing the output itself with one or two warpgroups; the default
    # (auto) tile on every case, the others rotating over the shapes (each sees every block
    # size, ratio and head dim, and every layout of its shapes: one compile serves the three).
    k = i // len(LAYOUTS)  # shape index (bs, ratio, head_dim)
    if backend == "mosaic":
      tiles = [(None, None, 2, None), [(64, 3, 3, 1), (64, 1, 2, 2), (128, 1, 2, 1)][k % 3]]
      if k % 5 == 1:  # splits and streams together
        tiles.append((64, 2, 2, 2 if head_dim == 128 else 4))
    else:
      tiles = [(64, 3, 2, 1)]
    for chunk_tokens, splits, stages, streams in tiles:
      kw = dict(stages=stages, streams=streams) if backend == "mosaic" else {}
      try:
        out = paged_decode_attention(*attn_args(c), backend=backend, chunk_tokens=chunk_tokens,
                                     num_splits=splits, **kw)
        check(out, c, jnp.bfloat16)
      except AssertionError as e:
        failures.append(f"{bs=} {ratio=} {head_dim=} {layout} {chunk_tokens=} {splits=} "
                        f"{streams=}: {e}")
  assert not failures, "\n".join(failures[:10])


@pytest.mark.gpu
@gpu
def test_gpu_mosaic_small_batch_and_descriptor_fallback():
  """A batch of 3 (the kernel reads its lengths one by one), and block-table rows that are not
  whole 16-byte units, which the kernel cannot copy: the call builds the descriptor plan."""
  from pallas_kernels.paged_attention_mgpu import table_plan_ok
  for i, (lengths, mb) in enumerate((([5, 0, 200], 24), ([1, 17, 90, 33, 111], 7))):
    assert table_plan_ok(mb) == (mb == 24)
    for layout in ("runs", "fragmented"):
      c = make_case(40 + i, bs=16, ratio=4, head_dim=128, layout=layout, dtype=jnp.bfloat16,
                    max_blocks=mb, lengths=lengths)
      check(paged_decode_attention(*attn_args(c), backend="mosaic"), c, jnp.bfloat16)


@pytest.mark.gpu
@gpu
def test_gpu_copy_blocks_mosaic():
  for dtype in (jnp.bfloat16, np.float32):
    k, v, moves, want_k, want_v = _copy_case(1, L=3, hkv=8, N=40, bs=16, D=128, dtype=dtype)
    nk, nv = block_copy.copy_blocks(k, v, moves, backend="mosaic")
    np.testing.assert_array_equal(np.asarray(nk.astype(jnp.float32)),
                                  np.asarray(want_k).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(nv.astype(jnp.float32)),
                                  np.asarray(want_v).astype(np.float32))
