#!/usr/bin/env python3
"""Which ways of moving blocks between a pinned-host pool and the device does XLA turn into DMAs?

A host pool `[L, NH, K, bs, E]` (pinned_host) and device rows are moved with the patterns the
host tier can use; each is timed (median of repeated calls, after a warm-up call) and its
effective bandwidth is printed next to a plain `jax.device_put` of the same bytes.

  python scripts/bench_host_copies.py --pool-gb 2 --extent-blocks 8 --extents 4 --out-json x.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--pool-gb", type=float, default=2.0)
  p.add_argument("--layers", type=int, default=30)
  p.add_argument("--kv-heads", type=int, default=3)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--block-size", type=int, default=16)
  p.add_argument("--extent-blocks", type=int, default=8)
  p.add_argument("--extents", type=int, default=4)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--out-json")
  args = p.parse_args(argv)
  import jax
  import jax.numpy as jnp
  from jax.sharding import SingleDeviceSharding

  dev = jax.devices()[0]
  kinds = {m.kind for m in dev.addressable_memories()}
  hk = "pinned_host" if "pinned_host" in kinds else None
  H = SingleDeviceSharding(dev, memory_kind=hk)
  D = SingleDeviceSharding(dev, memory_kind="device")
  L, K, bs, E, R, X = args.layers, args.kv_heads, args.block_size, args.head_dim, args.extent_blocks, args.extents
  block_bytes = L * K * bs * E * 2
  nh = int(args.pool_gb * 1e9 // block_bytes) // R * R
  host = jax.device_put(np.zeros((L, nh, K, bs, E), jnp.bfloat16), H)
  rows = jnp.ones((L, X * R, K, bs, E), jnp.bfloat16)  # X extents of all layers, on the device
  starts = jnp.asarray(np.random.default_rng(0).choice(nh // R, X, replace=False) * R, jnp.int32)
  moved = X * R * block_bytes
  to_host = (lambda x: jax.device_put(x, jax.memory.Space.Host)) if hk else (lambda x: x)
  to_dev = (lambda x: jax.device_put(x, jax.memory.Space.Device)) if hk else (lambda x: x)

  def timeit(fn, *a, donate_first=False):
    out = fn(*a)
    jax.block_until_ready(out)
    ts = []
    for _ in range(args.iters):
      if donate_first:
        a = (out,) + a[1:]
      t = time.perf_counter()
      out = fn(*a)
      jax.block_until_ready(out)
      ts.append(time.perf_counter() - t)
    return float(np.median(ts)), out

  res = {}

  def record(name, fn, *a, donate_first=False):
    try:
      t, out = timeit(fn, *a, donate_first=donate_first)
      res[name] = {"ms": t * 1e3, "GB_s": moved / t / 1e9}
      print(f"{name:34s} {t * 1e3:9.3f} ms  {moved / t / 1e9:7.2f} GB/s", flush=True)
      return out
    except Exception as e:  # noqa: BLE001
      res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      print(f"{name:34s} failed: {res[name]['error']}", flush=True)
      return a[0] if donate_first else None

  # Host -> device.
  def ds_loop(h, st, n):
    def body(i, acc):
      x = jax.lax.dynamic_slice(h, (0, st[i], 0, 0, 0), (L, R, K, bs, E))
      return jax.lax.dynamic_update_slice(acc, to_dev(x), (0, i * R, 0, 0, 0))
    return jax.lax.fori_loop(0, n, body, jnp.zeros((L, X * R, K, bs, E), h.dtype))
  record("h2d fori_loop(dynamic n) DS", jax.jit(ds_loop), host, starts, jnp.int32(X))

  def ds_unrolled(h, st):
    xs = [to_dev(jax.lax.dynamic_slice(h, (0, st[i], 0, 0, 0), (L, R, K, bs, E))) for i in range(X)]
    return jnp.concatenate(xs, axis=1)
  record("h2d unrolled DS (static count)", jax.jit(ds_unrolled), host, starts)

  def ds_per_layer(h, st):
    out = []
    for l in range(L):
      out.append(jnp.concatenate([to_dev(jax.lax.dynamic_slice(h, (l, st[i], 0, 0, 0), (1, R, K, bs, E)))
                                  for i in range(X)], axis=1))
    return jnp.concatenate(out, axis=0)
  record("h2d unrolled DS per layer", jax.jit(ds_per_layer), host, starts)

  def eager_put(h, st):
    return [jax.device_put(h[:, int(s):int(s) + R], D) for s in np.asarray(st)]
  record("h2d eager slice + device_put", eager_put, host, starts)

  ext_host = [jax.device_put(np.zeros((L, R, K, bs, E), jnp.bfloat16), H) for _ in range(X)]
  record("h2d device_put of separate arrays", lambda xs: jax.device_put(xs, D), ext_host)

  # Device -> host.
  def dus_loop(h, x, st, n):
    def body(i, h):
      return jax.lax.dynamic_update_slice(h, to_host(jax.lax.dynamic_slice_in_dim(x, i * R, R, 1)),
                                          (0, st[i], 0, 0, 0))
    return jax.lax.fori_loop(0, n, body, h)
  host = record("d2h fori_loop(dynamic n) DUS", jax.jit(dus_loop, donate_argnums=0), host, rows, starts,
                jnp.int32(X), donate_first=True)

  def dus_unrolled(h, x, st):
    for i in range(X):
      h = jax.lax.dynamic_update_slice(h, to_host(x[:, i * R:(i + 1) * R]), (0, st[i], 0, 0, 0))
    return h
  host = record("d2h unrolled DUS (static count)", jax.jit(dus_unrolled, donate_argnums=0), host, rows, starts,
                donate_first=True)

  record("d2h device_put to new host arrays",
         lambda x: jax.device_put([x[:, i * R:(i + 1) * R] for i in range(X)], H), rows)
  meta = {"device": dev.device_kind, "jax": jax.__version__, "memory_kind": hk, "pool_blocks": nh,
          "block_bytes": block_bytes, "extent_blocks": R, "extents": X, "bytes_moved": moved,
          "command": "python scripts/bench_host_copies.py " + " ".join(sys.argv[1:] if argv is None else argv)}
  if args.out_json:
    with open(args.out_json, "w") as f:
      json.dump({"meta": meta, "results": res}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
