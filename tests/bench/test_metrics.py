"""kvrm_jax.bench.metrics and kvrm_jax.bench.cupti."""

import numpy as np
import pytest

from kvrm_jax.bench import cupti, metrics


def test_percentiles_ratios_and_cdf():
  xs = np.arange(1, 101, dtype=float)
  p = metrics.pct(xs, (50, 99, 100))
  assert p == {"p50": pytest.approx(50.5), "p99": pytest.approx(99.01), "max": 100.0}
  assert metrics.pct([], (50,)) == {"p50": None}
  assert metrics.ratio_of({"p99": 4.0}, {"p50": 2.0}) == 2.0 and metrics.ratio_of({"a": None}, {"b": 1.0}) is None
  c = metrics.cdf(xs, points=4)
  assert c == [1.0, 25.75, 50.5, 75.25, 100.0] and metrics.cdf([]) == []


def test_compact_keeps_the_largest_row_per_bucket():
  rows = [[i, float(i % 7)] for i in range(100)]
  out = metrics.compact(rows, key=1, max_points=10)
  assert len(out) == 10
  for b, r in enumerate(out):  # each bucket of 10 rows keeps its largest value
    assert r[1] == max(x[1] for x in rows[10 * b:10 * b + 10])
  assert metrics.compact(rows[:5], key=1) == rows[:5]


def test_kernel_timings_without_cupti(monkeypatch):
  monkeypatch.setattr(cupti, "cupti_ext", lambda: None)
  with pytest.raises(RuntimeError, match="no CUPTI"):
    cupti.kernel_timings(lambda: None)


def test_profile_buckets_put_both_attention_kernels_under_attention():
  from kvrm_jax.bench.profile import bucket
  assert bucket("paged_decode_mgpu_c128_st2_w1_mosaic_gpu_kernel") == "attention"
  assert bucket("paged_tile_mgpu_c128_st2_w1_table_mosaic_gpu_kernel") == "attention"  # was "other"
  assert bucket("paged_tile_generic_c64_s1") == "attention"
  assert bucket("nvjet_sm90_tst_256x160_64x4_1x2_h_ssched_bz_coopA_NNT") == "matmul"
  assert bucket("loop_pad_fusion_34") == "other"
