# Paged attention of query tiles (the prompt chunks of prefill and mixed steps) against a float64
# numpy oracle. CPU: the pure-jnp reference, the generic Pallas kernel in interpret mode, and the
# Mosaic path's tiling (pieces of 64 / G tokens, its row order). GPU (marked `gpu`): Mosaic GPU and
# Triton kernels.
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_attention as pa

ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU (on a GPU machine: make test-gpu)")


@pytest.fixture(autouse=True)
def exact_float32(request):
  """Exact float32 dots as inside a float32 engine step (GPUs default to TF32 outside one)."""
  if request.node.get_closest_marker("gpu"):
    yield
    return
  with jax.default_matmul_precision("highest"):
    yield


def make_case(seed, *, tq, kv_heads, g, d, bs, max_blocks, tiles, dtype=np.float32, contiguous=False):
  """tiles: (start, real tokens) per tile ((0, 0): unused). Each tile's sequence owns the blocks
  up to its last real token; every other pool row is NaN (what a freed block may hold)."""
  rng = np.random.default_rng(seed)
  n = len(tiles)
  pool_blocks = 1 + n * max_blocks + 3
  k = rng.standard_normal((kv_heads, pool_blocks, bs, d)).astype(np.float32)
  v = rng.standard_normal((kv_heads, pool_blocks, bs, d)).astype(np.float32)
  owned = np.zeros((pool_blocks, bs), bool)
  free = list(rng.permutation(np.arange(1, pool_blocks))) if not contiguous else list(range(1, pool_blocks))
  bt = np.zeros((n, max_blocks), np.int32)
  starts = np.array([s for s, _ in tiles], np.int32)
  lengths = np.array([s + m if m else 0 for s, m in tiles], np.int32)
  for i, ln in enumerate(lengths):
    nb = -(-int(ln) // bs)
    bt[i, :nb] = [free.pop(0) for _ in range(nb)]
    for t in range(ln):
      owned[bt[i, t // bs], t % bs] = True
  k[:, ~owned], v[:, ~owned] = np.nan, np.nan
  q = rng.standard_normal((n, tq, kv_heads * g, d)).astype(np.float32)
  cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
  return dict(q=cast(q), k=cast(k), v=cast(v), starts=jnp.asarray(starts), lengths=jnp.asarray(lengths),
              bt=jnp.asarray(bt))


def oracle(c):
  """float64, one query token at a time: token i of tile n sees keys 0 .. start + i, < length."""
  q, k, v = (np.asarray(c[x], np.float64) for x in ("q", "k", "v"))
  n, tq, hq, d = q.shape
  hkv, _, bs, _ = k.shape
  g = hq // hkv
  out = np.zeros_like(q)
  for i in range(n):
    start, ln = int(c["starts"][i]), int(c["lengths"][i])
    bt = np.asarray(c["bt"][i])
    for t in range(tq):
      keys = min(start + t + 1, ln)
      if keys <= 0:
        continue
      kk = np.stack([k[:, bt[j // bs], j % bs] for j in range(keys)], 1)  # [Hkv, keys, D]
      vv = np.stack([v[:, bt[j // bs], j % bs] for j in range(keys)], 1)
      for h in range(hq):
        s = kk[h // g] @ q[i, t, h] / math.sqrt(d)
        p = np.exp(s - s.max())
        out[i, t, h] = (p / p.sum()) @ vv[h // g]
  return out


def real_rows(c):
  """[N, Tq] mask of the real (non-padding) query tokens."""
  tq = c["q"].shape[1]
  return (np.asarray(c["starts"])[:, None] + np.arange(tq)[None, :]) < np.asarray(c["lengths"])[:, None]


def check(out, c, tol):
  out = np.asarray(out, np.float64)
  real = real_rows(c)
  assert np.isfinite(out[real]).all()
  np.testing.assert_allclose(out[real], oracle(c)[real], atol=tol, rtol=tol)


# (start, real tokens): from position 0, a start mid-block, a tile past a long history, a partial
# tile (padding after its last token), an unused tile.
TILES = [(0, 8), (5, 8), (37, 8), (13, 3), (0, 0)]
CASES = [dict(tq=8, kv_heads=2, g=1, d=16, bs=4, max_blocks=12),
         dict(tq=8, kv_heads=2, g=3, d=16, bs=4, max_blocks=12),
         dict(tq=8, kv_heads=1, g=4, d=32, bs=8, max_blocks=6)]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("path", ["reference", "interpret"])
def test_tile_attention_matches_oracle(case, path):
  c = make_case(case, tiles=TILES, **CASES[case])
  args = (c["q"], c["k"], c["v"], c["starts"], c["lengths"], c["bt"])
  out = (pa.paged_tile_attention_reference(*args) if path == "reference"
         else pa.paged_tile_attention(*args, interpret=True))
  check(out, c, 1e-5)
  assert out.shape == c["q"].shape and out.dtype == c["q"].dtype
  if path == "interpret":  # an unused tile's rows are zeros
    assert not np.asarray(out[-1]).any()


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_block_offset_reads_one_layer_of_a_stacked_pool(backend):
  c = make_case(7, tiles=TILES[:4], **CASES[1])
  n = c["k"].shape[1]
  junk = jnp.full_like(c["k"], jnp.nan)
  k2, v2 = jnp.concatenate([junk, c["k"]], 1), jnp.concatenate([junk, c["v"]], 1)  # layer 1 of 2
  out = pa.paged_tile_attention(c["q"], k2, v2, c["starts"], c["lengths"], c["bt"], block_offset=n,
                                backend=backend)
  check(out, c, 1e-5)


def test_mosaic_tiling_pieces_and_row_order():
  """What the Mosaic path does around its kernel, checked on CPU: each tile cut into pieces of
  64 / G tokens with their own starts and lengths gives the same attention, and the rows of a
  program are (token, q head) of one kv head, token-major, and map back."""
  c = make_case(3, tiles=TILES, **CASES[2])
  n, tq, hq, d = c["q"].shape
  sub, u = 2, tq // 2
  st, ln, bt = pa.split_tiles(c["starts"], c["lengths"], c["bt"], sub, u)
  pieces = pa.paged_tile_attention_reference(c["q"].reshape(n * u, sub, hq, d), c["k"], c["v"], st, ln, bt)
  check(pieces.reshape(n, tq, hq, d), c, 1e-5)
  assert (np.asarray(ln).reshape(n, u)[-1] == 0).all()  # the unused tile: pieces without keys
  hkv, g = 1, hq
  rows = pa.program_rows(c["q"], hkv)
  assert rows.shape == (n, hkv * tq * g, d)
  np.testing.assert_array_equal(rows[2, 5 * g + 1], c["q"][2, 5, 1])  # row r: token r // G, head r % G
  np.testing.assert_array_equal(pa.from_program_rows(rows, hkv, tq), c["q"])
  q2 = jnp.arange(2 * 3 * 8 * 1, dtype=jnp.float32).reshape(2, 3, 8, 1)  # 2 kv heads of 4 q heads
  r2 = pa.program_rows(q2, 2)
  assert float(r2[1, 3 * 4 + 2, 0]) == float(q2[1, 0, 4 + 2, 0])  # kv head 1, token 0, its q head 2
  np.testing.assert_array_equal(pa.from_program_rows(r2, 2, 3), q2)


def test_generic_kernel_cuts_long_tiles_into_pieces():
  """A tile of more rows than one program holds (a 512-token prefill chunk at G = 4 is 2,048 rows:
  on an H100 it asked for 560 KiB of shared memory) runs as pieces, the last one padded: same
  attention, an unused tile still zeros."""
  assert pa.generic_piece_tokens(512, 4, 128) == 64 and pa.generic_piece_tokens(64, 4, 128) == 64
  assert pa.generic_piece_tokens(8, 3, 16, max_rows=16) == 5  # 8 tokens: pieces of 5, padded to 10
  c = make_case(5, tiles=TILES, **CASES[1])
  out = pa.paged_tile_attention(c["q"], c["k"], c["v"], c["starts"], c["lengths"], c["bt"], interpret=True,
                                max_rows=16)
  assert out.shape == c["q"].shape
  check(out, c, 1e-5)
  assert not np.asarray(out[-1]).any()


@pytest.mark.parametrize("shape,dtype,mb,want", [
    ((4, 64, 32, 128), jnp.bfloat16, 256, "mosaic"),   # Llama-3-8B: G = 4, pieces of 16 tokens
    ((4, 8, 32, 128), jnp.bfloat16, 256, "triton"),    # 8 tokens: not whole pieces of 16
    ((4, 64, 24, 128), jnp.bfloat16, 256, "triton"),   # G = 3 does not divide 64 rows
    ((4, 64, 32, 128), jnp.float32, 256, "triton"),    # the Mosaic kernel is bf16 / f16
    ((4, 64, 32, 128), jnp.bfloat16, 254, "triton"),   # the table plan needs MB % 4 == 0
])
def test_tile_backend_takes_mosaic_only_where_it_applies(shape, dtype, mb, want, monkeypatch):
  monkeypatch.setattr(pa.mgpu, "available", lambda: True)  # the shape rules, whatever this jax has
  assert pa.tile_backend(shape, dtype, (8, 100, 16, 128), mb, backend="mosaic") == want
  assert pa.tile_backend(shape, dtype, (8, 100, 16, 128), mb, interpret=True) == "interpret"


def test_bad_tile_arguments_raise():
  c = make_case(0, tiles=TILES[:2], **CASES[0])
  with pytest.raises(ValueError, match="must be \\[N, Tq, Hq, D\\]"):
    pa.paged_tile_attention(c["q"][0], c["k"], c["v"], c["starts"], c["lengths"], c["bt"])
  with pytest.raises(ValueError, match="starts must be int32"):
    pa.paged_tile_attention(c["q"], c["k"], c["v"], c["starts"][:1], c["lengths"], c["bt"])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["mosaic", "triton"])
@pytest.mark.parametrize("tq,contiguous", [(64, False), (16, True), (32, False)])
def test_gpu_tile_kernel_matches_oracle(backend, tq, contiguous):
  """bf16, Llama-3-8B heads (G = 4, D = 128), 16-token blocks; tiles from position 0, mid-block,
  after a long history, partial and unused; NaN in every block no live token owns."""
  tiles = [(0, tq), (21, tq), (300, tq), (77, tq // 2 + 1), (0, 0)]
  c = make_case(11, tq=tq, kv_heads=2, g=4, d=128, bs=16, max_blocks=28, tiles=tiles, dtype=jnp.bfloat16,
                contiguous=contiguous)
  assert pa.tile_backend(c["q"].shape, c["q"].dtype, c["k"].shape, 28, backend=backend) == backend
  out = pa.paged_tile_attention(c["q"], c["k"], c["v"], c["starts"], c["lengths"], c["bt"], backend=backend)
  check(out, c, 2e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["mosaic", "triton"])
def test_gpu_tile_kernel_takes_a_512_token_prefill_chunk(backend):
  """A whole 512-token chunk as one tile (split-mode prefill of a long prompt), Llama-3-8B heads."""
  c = make_case(12, tq=512, kv_heads=2, g=4, d=128, bs=16, max_blocks=40, tiles=[(0, 512), (100, 512), (0, 0)],
                dtype=jnp.bfloat16)
  assert pa.tile_backend(c["q"].shape, c["q"].dtype, c["k"].shape, 40, backend=backend) == backend
  out = pa.paged_tile_attention(c["q"], c["k"], c["v"], c["starts"], c["lengths"], c["bt"], backend=backend)
  check(out, c, 2e-2)
