"""kvrm_jax.bench.workloads: request families and trace windows."""

import os

import numpy as np
import pytest

from kvrm_jax.bench import workloads
from kvrm_jax.cli import UserError


def test_trace_parsing(trace_files):
  a = workloads.parse_timestamp("2023-11-16 18:15:46.6805900")
  b = workloads.parse_timestamp("2023-11-16 18:15:46")
  assert a - b == pytest.approx(0.68059)
  csv_path, jsonl_path = trace_files
  ts, ctx, gen = workloads.load_trace(str(csv_path))
  assert len(ts) == 12 and ts[0] == 0 and ts[-1] == pytest.approx(2.9) and ctx[3] == 1000
  ts, ctx, gen = workloads.load_trace(str(jsonl_path))
  assert list(ctx) == [20, 21, 22, 23, 24, 25] and ts[3] == pytest.approx(0.14)
  assert workloads.trace_name(str(csv_path)) == "test"


def test_short_trace_names_come_from_the_traces_folder(trace_files, monkeypatch):
  csv_path, _ = trace_files
  monkeypatch.setenv(workloads.TRACES_ENV, str(csv_path.parent))
  assert workloads.resolve_trace("test") == str(csv_path)
  monkeypatch.delenv(workloads.TRACES_ENV)
  with pytest.raises(UserError, match=r"no trace 'test'.*KVRM_TRACES \(unset\)"):
    workloads.resolve_trace("test")
  assert workloads.resolve_trace(str(csv_path)) == str(csv_path)
  # A path with a folder is never looked up by name: a missing one is refused before any run starts.
  with pytest.raises(UserError, match=r"^no trace file '.*file\.csv'$"):
    workloads.resolve_trace(os.path.join(str(csv_path.parent), "file.csv"))


@pytest.mark.parametrize("family", workloads.FAMILIES)
def test_families_fit_the_context_and_are_seeded(family):
  work = workloads.make_workload(family, 32, 256, 1000, np.random.default_rng(7))
  again = workloads.make_workload(family, 32, 256, 1000, np.random.default_rng(7))
  assert work == again and len(work) == 32
  assert all(len(p) >= 1 and n >= 1 and len(p) + n <= 256 for p, n in work)
  assert all(3 <= t < 1000 for p, _ in work for t in p)
  d = workloads.describe(work)
  assert d["num_requests"] == 32 and d["output_tokens"]["total"] == sum(n for _, n in work)


def test_family_names_are_checked():
  assert workloads.parse_families("mixed, uniform") == ["mixed", "uniform"]
  for bad in ("mixed,mixed", "", "bursty"):
    with pytest.raises(UserError, match="--families"):
      workloads.parse_families(bad)
  with pytest.raises(UserError, match="unknown family"):
    workloads.make_workload("bursty", 1, 64, 100, np.random.default_rng(0))
