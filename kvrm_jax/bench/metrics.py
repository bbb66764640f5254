"""Summary statistics of a run: percentiles, CDF points and down-sampled time series."""

from __future__ import annotations

import numpy as np

SPIKE_FACTOR = 3.0  # a step-time spike: a step longer than 3x the median step


def pct(xs, qs) -> dict:
  xs = np.asarray(xs, float)
  names = {100: "max"}
  if not len(xs):
    return {names.get(q, f"p{q}"): None for q in qs}
  return {names.get(q, f"p{q}"): float(np.percentile(xs, q)) for q in qs}


def ratio_of(a: dict, b: dict):
  (x,), (y,) = a.values(), b.values()
  return x / y if x is not None and y else None


def cdf(xs, points: int = 200) -> list:
  """Quantiles of xs at 0..100% (points + 1 values) for CDF plots."""
  xs = np.asarray(xs, float)
  if not len(xs):
    return []
  return [round(float(v), 4) for v in np.percentile(xs, np.linspace(0, 100, points + 1))]


def compact(rows: list[list], key: int, max_points: int = 2000) -> list[list]:
  """Down-sample a time series to <= max_points rows, keeping the row with the largest `key` per bucket."""
  if len(rows) > max_points:
    edges = np.linspace(0, len(rows), max_points + 1).astype(int)
    rows = [max(rows[a:b], key=lambda r: r[key]) for a, b in zip(edges[:-1], edges[1:]) if b > a]
  return [[round(float(v), 5) if isinstance(v, float) else v for v in r] for r in rows]
