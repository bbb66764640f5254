"""Heterogeneous memory tier: KV blocks in pinned host memory beside the device pool.

Every logical block of a request lives on one tier. Host blocks are handed out in *extents* of
`host_extent` consecutive host blocks; an extent belongs to one request and is the unit of
transfer, so blocks cross the host<->device link as a few large copies instead of block by block
(`host_extent=1` is the block-by-block baseline). Two paths use the tier:

* placement: a running request whose blocks no longer fit the device pool keeps cold full blocks
  (chosen by a `policy`) on the host; the decode step stages its host extents layer by layer
  (one host->device copy per extent and layer) and attends to them exactly, merging the partial
  softmax statistics with the device part's (no approximation);
* swap: preemption moves a running request's blocks to the host (one device->host copy per
  extent) and back when it resumes, instead of recomputing its prompt and outputs.

Host pool: `[L, NH, K, bs, E]` (layer outermost, so one extent of one layer, and one extent of all
layers' block rows, is contiguous per KV head shard); memory kind `pinned_host` where the backend
has it. Device pool: `[K, L, N, bs, E]` (kvrm_jax/step.py).

Host side (this module, numpy): `HostTier` (extent allocator, per-request host blocks) and the
placement policies. Device side: `swap_blocks` (the jitted swap op) and `stage_layer` /
`host_attention` (inside the decode step).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from kvrm_jax.config import ModelConfig, RuntimeConfig

POLICIES = ("recency", "attention")


# ----------------------------------------------------------------------------- host side


class OutOfHostBlocks(Exception):
  """The host tier has no free extent."""


@dataclasses.dataclass
class HostRecord:
  """A request's host-resident blocks. blocks[i] = extent * host_extent + offset."""

  extents: list[int] = dataclasses.field(default_factory=list)
  blocks: list[int] = dataclasses.field(default_factory=list)
  placed: int = 0  # leading entries of `blocks` kept there by placement (the rest: swapped out)
  placed_extents: int = 0  # leading entries of `extents` holding those


class HostTier:
  """Extent allocator of the host pool and the host-resident blocks of each request.

  Extents freed in a round (by a swap-in that has not run yet) are held until `end_round()`, so a
  swap-out planned in the same round cannot overwrite them before they are read.
  """

  def __init__(self, rt: RuntimeConfig):
    self.extent = rt.host_extent
    self.num_extents = rt.host_extents
    self._free = list(range(self.num_extents - 1, 0, -1))  # extent 0 is the null extent
    self._held: list[int] = []
    self._taken: dict[int, tuple[list[int], list[int]]] = {}  # this round's take()s
    self.records: dict[int, HostRecord] = {}

  @property
  def num_free_extents(self) -> int:
    return len(self._free)

  @property
  def num_used_blocks(self) -> int:
    return sum(len(r.blocks) for r in self.records.values())

  @property
  def num_used_extents(self) -> int:
    return self.num_extents - 1 - len(self._free)

  def record(self, rid: int) -> HostRecord:
    return self.records.setdefault(rid, HostRecord())

  def extents_for(self, num_blocks: int) -> int:
    return -(-num_blocks // self.extent)

  def store(self, rid: int, device_blocks: list[int], placed: bool) -> list[tuple[int, list[int]]]:
    """Give the blocks fresh extents; returns the swap-out list [(extent, device blocks)]."""
    n = self.extents_for(len(device_blocks))
    if n > len(self._free):
      raise OutOfHostBlocks(f"{n} extents needed, {len(self._free)} free")
    rec = self.record(rid)
    if placed and len(rec.blocks) > rec.placed:
      raise ValueError("placement of a request whose blocks are swapped out")
    out = []
    for i in range(n):
      ext = self._free.pop()
      chunk = device_blocks[i * self.extent:(i + 1) * self.extent]
      rec.extents.append(ext)
      rec.blocks.extend(ext * self.extent + j for j in range(len(chunk)))
      out.append((ext, list(chunk)))
    if placed:
      rec.placed, rec.placed_extents = len(rec.blocks), len(rec.extents)
    return out

  def placed(self, rid: int) -> tuple[list[int], list[int]]:
    """(extents, blocks) a running request keeps on the host by placement."""
    rec = self.records.get(rid)
    if rec is None:
      return [], []
    return rec.extents[:rec.placed_extents], rec.blocks[:rec.placed]

  def swapped_extents(self, rid: int) -> int:
    rec = self.records.get(rid)
    return 0 if rec is None else len(rec.extents) - rec.placed_extents

  def take(self, rid: int) -> tuple[list[int], list[int]]:
    """Swap-in of a request's swapped-out blocks: (their extents, their host blocks in order).

    Blocks it keeps on the host by placement stay there (and in its record). The taken extents
    are freed at the end of the round (after the swap that reads them), unless `untake` puts
    them back first (the request was preempted again in the same round)."""
    rec = self.records.get(rid)
    if rec is None:
      return [], []
    exts, blocks = rec.extents[rec.placed_extents:], rec.blocks[rec.placed:]
    self._taken[rid] = (exts, blocks)
    del rec.extents[rec.placed_extents:], rec.blocks[rec.placed:]
    if not rec.extents:
      del self.records[rid]
    self._held.extend(exts)
    return exts, blocks

  def untake(self, rid: int) -> bool:
    """Cancel this round's take(rid): its swapped-out blocks are on the host again, untouched."""
    taken = self._taken.pop(rid, None)
    if taken is None:
      return False
    exts, blocks = taken
    rec = self.record(rid)
    rec.extents.extend(exts)
    rec.blocks.extend(blocks)
    held = set(exts)
    self._held = [e for e in self._held if e not in held]
    return True

  def free(self, rid: int) -> None:
    """Drop a request's host blocks now (it finished or is recomputed: nothing will read them)."""
    rec = self.records.pop(rid, None)
    if rec is not None:
      self._free.extend(rec.extents)

  def end_round(self) -> None:
    self._free.extend(self._held)
    self._held.clear()
    self._taken.clear()

  def check_invariants(self) -> None:
    owned = [e for r in self.records.values() for e in r.extents]
    alls = owned + self._free + self._held
    assert sorted(alls) == list(range(1, self.num_extents)), "extent leaked or double-owned"
    for r in self.records.values():
      assert 0 <= r.placed <= len(r.blocks)
      assert {b // self.extent for b in r.blocks} <= set(r.extents)


def pick_blocks(policy: str, candidates: np.ndarray, mass: np.ndarray | None, n: int) -> np.ndarray:
  """Table indices of the n blocks to place on the host among `candidates` (full, non-tail).

  recency: the oldest (lowest logical index); attention: the least accumulated attention mass
  (ties to the oldest).
  """
  if policy == "recency" or mass is None:
    return np.sort(candidates)[:n]
  order = np.lexsort((candidates, mass[candidates]))
  return np.sort(candidates[order[:n]])


def placement_bound(kv_bytes: float, hbm_bytes: float, hbm_bw: float, host_bw: float) -> dict:
  """Upper bound on the aggregate KV read bandwidth of one decode step over two tiers.

  Following the placement formulation of arXiv 2508.13231 (its static, migration-free form):
  a step reads kv_bytes; x of them from HBM (x <= hbm_bytes, the capacity the KV may use there)
  and kv_bytes - x from host memory, both tiers streaming concurrently, so the step's KV time is
  max(x / hbm_bw, (kv_bytes - x) / host_bw). It is smallest at the bandwidth-proportional split
  x* = kv_bytes * hbm_bw / (hbm_bw + host_bw), clipped to the capacity. Returns x*, the minimal
  time and the bound kv_bytes / t* (bytes/s).
  """
  x = min(hbm_bytes, kv_bytes * hbm_bw / (hbm_bw + host_bw), kv_bytes)
  t = max(x / hbm_bw, (kv_bytes - x) / host_bw)
  return {"hbm_bytes": x, "host_bytes": kv_bytes - x, "time_s": t,
          "bandwidth": kv_bytes / t if t > 0 else math.inf}


# ----------------------------------------------------------------------------- device side


def host_pool_shape(cfg: ModelConfig, rt: RuntimeConfig) -> tuple[int, ...]:
  return (cfg.num_layers, rt.host_extents * rt.host_extent, cfg.num_kv_heads, rt.block_size, cfg.head_dim)


def host_memory_kind() -> str | None:
  """`pinned_host` where the default device has it, else None (the device's default memory)."""
  kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
  return "pinned_host" if "pinned_host" in kinds else None


def init_host_pools(cfg: ModelConfig, rt: RuntimeConfig, mesh=None):
  """Zero K and V host pools, built on the host (they may exceed the device memory)."""
  from jax.sharding import NamedSharding, SingleDeviceSharding
  kind = host_memory_kind()
  if mesh is None:
    sh = SingleDeviceSharding(jax.devices()[0], memory_kind=kind)
  else:
    from kvrm_jax import sharding
    sh = NamedSharding(mesh, sharding.HOST_POOL_SPEC, memory_kind=kind)
  z = np.zeros(host_pool_shape(cfg, rt), jnp.dtype(rt.dtype))
  return jax.device_put(z, sh), jax.device_put(z, sh)


def _to_host(x):
  return jax.device_put(x, jax.memory.Space.Host) if host_memory_kind() else x


def _to_device(x):
  return jax.device_put(x, jax.memory.Space.Device) if host_memory_kind() else x


def swap_blocks(k_pool, v_pool, k_host, v_host, ints, rt: RuntimeConfig):
  """Swap-outs then swap-ins, one host copy per extent (all layers, this shard's KV heads).

  pools: [K, L, N, bs, E]; host pools: [L, NH, K, bs, E]; ints: the packed `swap_layout`.
  Outs run first: a device block freed by a swap-out may be the destination of a swap-in.
  Padding rows of an extent's block list point at the null block 0.
  """
  d = swap_layout(rt).unpack(ints, jnp.zeros((0,), jnp.float32))
  r = rt.host_extent

  def out(i, pools):
    kp, vp, kh, vh = pools
    def put(pool, host):
      x = pool[:, :, d["out_blocks"][i]].transpose(1, 2, 0, 3, 4)  # [L, R, K, bs, E]
      return jax.lax.dynamic_update_slice(host, _to_host(x), (0, d["out_ext"][i] * r, 0, 0, 0))
    return kp, vp, put(kp, kh), put(vp, vh)

  def inn(i, pools):
    kp, vp, kh, vh = pools
    def get(pool, host):
      nl, _, kh_, bs, e = host.shape
      x = _to_device(jax.lax.dynamic_slice(host, (0, d["in_ext"][i] * r, 0, 0, 0), (nl, r, kh_, bs, e)))
      return pool.at[:, :, d["in_blocks"][i]].set(x.transpose(2, 0, 1, 3, 4))
    return get(kp, kh), get(vp, vh), kh, vh

  pools = jax.lax.fori_loop(0, d["counts"][0], out, (k_pool, v_pool, k_host, v_host))
  return jax.lax.fori_loop(0, d["counts"][1], inn, pools)


def swap_layout(rt: RuntimeConfig):
  from kvrm_jax.descriptor import Layout
  x, r = max(rt.max_swap_extents, 1), rt.host_extent
  return Layout(ints=(("out_ext", (x,)), ("out_blocks", (x, r)), ("in_ext", (x,)), ("in_blocks", (x, r)),
                      ("counts", (2,))), floats=())


def stage(host, layer, extents, n, extent_blocks: int):
  """Host extents of one layer -> device rows [X * R, K, bs, E]: n copies, the rest zero."""
  _, _, kh, bs, e = host.shape
  x, r = extents.shape[0], extent_blocks

  def body(i, staged):
    blk = jax.lax.dynamic_slice(host, (layer, extents[i] * r, 0, 0, 0), (1, r, kh, bs, e))[0]
    return jax.lax.dynamic_update_slice(staged, _to_device(blk), (i * r, 0, 0, 0))

  return jax.lax.fori_loop(0, n, body, jnp.zeros((x * r, kh, bs, e), host.dtype))


def host_attention(q, staged_k, staged_v, table, count, block_size: int):
  """Exact attention of each slot over its staged host blocks -> (o [S, H, E] f32, lse [S, H]).

  q: [S, H, E]; staged: [X * R, K, bs, E]; table: [S, Hm] staged row per host block; count: [S].
  """
  from kvrm_jax import model as model_lib
  s, hm = table.shape
  k = staged_k[table]  # [S, Hm, K, bs, E]
  v = staged_v[table]
  kh, e = k.shape[2], k.shape[-1]
  k = k.transpose(0, 2, 1, 3, 4).reshape(s, kh, hm * block_size, e)
  v = v.transpose(0, 2, 1, 3, 4).reshape(s, kh, hm * block_size, e)
  mask = jnp.arange(hm * block_size)[None, :] < (count * block_size)[:, None]  # [S, Hm*bs]
  o, lse = model_lib.attention(q[:, None], k, v, mask[:, None, :], return_lse=True)
  return o[:, 0], lse[:, 0]


def combine(o_a, lse_a, o_b, lse_b):
  """Merge two partial attentions over disjoint keys: o [S, H, E], lse [S, H] -> (o, lse).

  Where one side has no keys (lse -inf) the other side's o is returned exactly."""
  m = jnp.maximum(lse_a, lse_b)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  wa = jnp.where(jnp.isfinite(lse_a), jnp.exp(lse_a - m), 0.0)
  wb = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - m), 0.0)
  den = wa + wb
  o = (o_a.astype(jnp.float32) * wa[..., None] + o_b.astype(jnp.float32) * wb[..., None]) / \
      jnp.where(den > 0, den, 1.0)[..., None]
  o = jnp.where((wb == 0)[..., None], o_a.astype(jnp.float32), o)
  lse = jnp.where(den > 0, m + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)
  return o, lse
