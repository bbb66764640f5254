"""The host memory tier on the device: host pools, the swap op, and the per-layer staging and
exact attention over host-resident blocks inside the decode step (policy and bookkeeping:
kvrm_jax/sched/tier.py).

Host pool: `[L, NH, K, bs, E]` (layer outermost, so one extent of one layer, and one extent of all
layers' block rows, is contiguous per KV head shard); memory kind `pinned_host` where the backend
has it. Device pool: `[K, L, N, bs, E]` (kvrm_jax/step/block_ops.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding

from kvrm_jax import descriptor as desc_lib
from kvrm_jax.config import ModelConfig, RuntimeConfig
from kvrm_jax.model import llama as model_lib
from kvrm_jax.step import sharding


def host_pool_shape(cfg: ModelConfig, rt: RuntimeConfig) -> tuple[int, ...]:
  return (cfg.num_layers, rt.host_extents * rt.host_extent, cfg.num_kv_heads, rt.block_size, cfg.head_dim)


def host_memory_kind() -> str | None:
  """`pinned_host` where the default device has it, else None (the device's default memory)."""
  kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
  return "pinned_host" if "pinned_host" in kinds else None


def init_host_pools(cfg: ModelConfig, rt: RuntimeConfig, mesh=None):
  """Zero K and V host pools, built on the host (they may exceed the device memory)."""
  kind = host_memory_kind()
  if mesh is None:
    sh = SingleDeviceSharding(jax.devices()[0], memory_kind=kind)
  else:
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
  d = desc_lib.swap_layout(rt).unpack(ints, jnp.zeros((0,), jnp.float32))
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
  s, hm = table.shape
  k = staged_k[table]  # [S, Hm, K, bs, E]
  v = staged_v[table]
  kh, e = k.shape[2], k.shape[-1]
  k = k.transpose(0, 2, 1, 3, 4).reshape(s, kh, hm * block_size, e)
  v = v.transpose(0, 2, 1, 3, 4).reshape(s, kh, hm * block_size, e)
  mask = jnp.arange(hm * block_size)[None, :] < (count * block_size)[:, None]  # [S, Hm*bs]
  o, lse = model_lib.attention(q[:, None], k, v, mask[:, None, :], return_lse=True)
  return o[:, 0], lse[:, 0]
