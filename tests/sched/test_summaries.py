"""Bounded far-history summaries: same executable, bounded blocks, exact when the window covers all."""

import numpy as np
import pytest

from conftest import TINY, random_prompts

from kvrm_jax.config import RuntimeConfig
from kvrm_jax.engine import Engine
from kvrm_jax.model import reference
from kvrm_jax.sched.request import SamplingParams
from kvrm_jax.sched.summaries import SummaryConfig, fold_targets

CFG = TINY
RT = RuntimeConfig(block_size=8, num_blocks=128, max_slots=4, max_blocks_per_seq=48, prefill_buckets=(8, 32),
                   max_summaries=4, max_folds=8)


_prompts = random_prompts


def test_window_covering_history_is_exact(model):
  ps = _prompts(0, (5, 30, 12))
  sp = SamplingParams(max_new_tokens=40, ignore_eos=True)
  ref = [reference.greedy_generate(model, p, 40) for p in ps]
  eng = Engine(CFG, model, RT, summaries=SummaryConfig(sink_blocks=1, window=128, max_entries=4))
  assert [o.output_ids for o in eng.generate(ps, sp)] == ref
  assert eng.stats.folds == 0


def test_bounded_blocks_and_no_recompile_when_switched_on(model):
  eng = Engine(CFG, model, RT)
  eng.generate(_prompts(1, (9,)), SamplingParams(max_new_tokens=4))  # summaries off: compiles the step
  assert eng.compiles.decode == 1
  sc = SummaryConfig(sink_blocks=1, window=24, max_entries=3)
  eng.sched.summaries = sc
  bs = RT.block_size
  bound = sc.sink_blocks + -(-sc.window // bs) + 1
  ps = _prompts(2, (20, 3, 41))
  rids = [eng.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(ps, (150, 200, 120))]
  worst = 0
  while eng.has_work():
    eng.step()
    for rid in rids:
      r = eng.requests[rid]
      if r.slot is not None and r.num_computed > 48:  # past the prompt (prompts fold as they decode)
        worst = max(worst, len(eng.sched.allocator.block_table(rid)))
        assert int((eng.sched.slots.sum_counts[r.slot] > 0).sum()) <= sc.max_entries
  assert eng.compiles.decode == 1
  assert eng.stats.folds > 0
  assert worst <= bound, (worst, bound)
  assert eng.sched.allocator.num_free_blocks == eng.sched.allocator.num_total_blocks  # summary blocks freed too
  eng.sched.allocator.check_invariants()
  assert all(len(eng.requests[r].output_ids) == n for r, n in zip(rids, (150, 200, 120)))


def test_summaries_and_drop_baseline_share_the_executable(model):
  """Exact, summarized (short window) and StreamingLLM-style dropping (max=0) on one engine: one
  decode compile; quality is measured in docs/summaries.md, not asserted here."""
  ps = _prompts(3, (60,))
  sp = SamplingParams(max_new_tokens=30, ignore_eos=True)
  outs = {}
  eng = Engine(CFG, model, RT, with_logits=True)
  for name, sc in [("exact", None), ("summ", SummaryConfig(1, 16, 4)), ("drop", SummaryConfig(1, 16, 0))]:
    eng.sched.summaries = sc
    outs[name] = eng.generate(ps, sp)[0].output_ids
  assert eng.compiles.decode == 1
  assert eng.stats.folds > 0
  assert len(outs["summ"]) == len(outs["drop"]) == 30


def test_folded_block_of_identical_tokens_is_exact():
  """A block whose tokens all share one key and one value has exactly the softmax mass of its
  summary row (mean key, log(count) bias): folding it must not change attention."""
  import jax.numpy as jnp

  from kvrm_jax.model.llama import matmul_precision
  from kvrm_jax.step import attention, block_ops, summaries
  rng = np.random.default_rng(0)
  kh, g, e, bs, n = 2, 3, 16, 8, 10
  k = rng.normal(size=(kh, 1, n, bs, e)).astype(np.float32)  # [K, L, N, bs, E]
  v = rng.normal(size=(kh, 1, n, bs, e)).astype(np.float32)
  k[:, :, 3] = rng.normal(size=(kh, 1, 1, e))  # block 3: one key, one value, bs times
  v[:, :, 3] = rng.normal(size=(kh, 1, 1, e))
  q = jnp.asarray(rng.normal(size=(1, kh * g, e)).astype(np.float32))
  k, v = jnp.asarray(k), jnp.asarray(v)
  full = {"block_tables": jnp.array([[1, 3, 5]]), "lengths": jnp.array([3 * bs])}
  with matmul_precision(jnp.float32):  # as inside a float32 step: exact float32 (no TF32 on GPUs)
    o_exact, _ = attention.decode_attention("reference", q, k, v, 0, full)
    folds, w = jnp.array([[3, 7 * bs]]), jnp.array([[0.0, 1.0]])
    kf, vf = block_ops.fold_blocks(k, folds, w), block_ops.fold_blocks(v, folds, w)
    d = {"block_tables": jnp.array([[1, 5]]), "lengths": jnp.array([2 * bs]),
         "summary_slots": jnp.array([[7 * bs, 0]]), "summary_counts": jnp.array([[float(bs), 0.0]])}
    o, lse = attention.decode_attention("reference", q, kf, vf, 0, d)
    merged = summaries.merge_summaries(o, lse, q, kf, vf, 0, d)
  assert float(jnp.linalg.norm(merged - o_exact) / jnp.linalg.norm(o_exact)) < 1e-5
  assert float(jnp.linalg.norm(o - o_exact) / jnp.linalg.norm(o_exact)) > 1e-3  # the summary matters


def test_fold_targets_distinct_and_balanced():
  assert fold_targets([], 3, 4) == [0, 1, 2]
  assert fold_targets([8, 8], 3, 4) == [2, 3, 1]
  assert fold_targets([16, 8, 8, 24], 2, 4) == [2, 1]
  with pytest.raises(ValueError):
    SummaryConfig.parse("sink=1,windw=3")
  assert SummaryConfig.parse("sink=2,window=64,max=3") == SummaryConfig(2, 64, 3)


def test_per_request_policies_share_one_batch(model):
  """Exact and summarized requests decode side by side; the exact one matches the reference."""
  p = _prompts(4, (50,))[0]
  sp = SamplingParams(max_new_tokens=40, ignore_eos=True)
  eng = Engine(CFG, model, RT)
  exact = eng.add_request(p, sp)
  eng.add_request(p, sp, summaries=SummaryConfig(1, 16, 2))
  while eng.has_work():
    eng.step()
  assert eng.requests[exact].output_ids == reference.greedy_generate(model, p, 40)
  assert eng.stats.folds > 0 and eng.compiles.decode == 1
  assert eng.sched.slots.own_summaries == 0  # the count that lets a step skip the fold walk

