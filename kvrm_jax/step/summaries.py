"""Far-history summaries inside the decode step: summary rows merged into exact attention."""

from __future__ import annotations

import math

import jax.numpy as jnp

from pallas_kernels.partition import merge_lse


def merge_summaries(o, lse, q, k_pool, v_pool, layer, d):
  """Add each slot's far-history summary rows to its exact attention (o, lse) -> [S, H, E].

  A summary row j (mean key/value of c_j folded tokens) enters the softmax with logit
  q.k_j * scale + log(c_j), so its mass matches the c_j tokens it stands for. Slots without
  summaries keep `o` exactly (the same executable serves summaries on and off).
  """
  s, h, e = q.shape
  bs = k_pool.shape[3]
  ss, cnt = d["summary_slots"], d["summary_counts"]  # [S, Ks]
  ks = k_pool[:, layer, ss // bs, ss % bs].astype(jnp.float32)  # [K, S, Ks, E]
  vs = v_pool[:, layer, ss // bs, ss % bs].astype(jnp.float32)
  kh = ks.shape[0]
  qg = q.reshape(s, kh, h // kh, e).astype(jnp.float32)
  valid = (cnt > 0)[:, None, None, :]  # [S, 1, 1, Ks]
  sc = jnp.einsum("skge,ksje->skgj", qg, ks) / math.sqrt(e) + jnp.log(jnp.maximum(cnt, 1.0))[:, None, None, :]
  sc = jnp.where(valid, sc, -jnp.inf)  # [S, K, G, Ks]
  # Each summary row is a partial attention over its folded tokens: o = its mean value, lse = sc.
  vs = jnp.where(jnp.isfinite(vs), vs, 0.0).transpose(1, 0, 2, 3)[:, :, None]  # [S, K, 1, Ks, E]
  rows = [jnp.broadcast_to(vs[:, :, :, j], (s, kh, h // kh, e)) for j in range(ss.shape[1])]
  merged, _ = merge_lse([o.reshape(s, kh, h // kh, e).astype(jnp.float32)] + rows,
                        [lse.reshape(s, kh, h // kh)] + [sc[..., j] for j in range(ss.shape[1])], base2=False)
  merged = merged.reshape(s, h, e)
  return jnp.where(jnp.any(cnt > 0, axis=-1)[:, None, None], merged, o.astype(jnp.float32))
