"""BlockPager: unit tests per method, hypothesis state-machine tests against a simulated device pool,
and a fragmentation/compaction workload. `python tests/sched/test_pager.py` prints host timings."""

import random
import time

import numpy as np
import pytest

pytest.importorskip("hypothesis", reason="the pager tests need hypothesis (pip install -e '.[test]')")
from hypothesis import HealthCheck, event, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule  # noqa: E402

from kvrm_jax.sched.pager import BlockPager, OutOfBlocks  # noqa: E402
from pallas_kernels.runs import coalesce_runs  # noqa: E402

POISON = "poison"


def expand(runs):
  # Runs back to a block table.
  return [p + i for p, _, n in runs for i in range(n)]


def check_runs(runs, table):
  assert expand(runs) == list(table)
  logical = 0
  for k, (p, l, n) in enumerate(runs):
    assert n >= 1 and l == logical
    logical += n
    if k:
      prev_p, _, prev_n = runs[k - 1]
      assert p != prev_p + prev_n, "runs not maximal"


class Device:
  """Fake pool: block -> list of per-token tags; ops run like the device (all reads, then writes)."""

  def __init__(self, num_blocks, block_size):
    self.bs = block_size
    self.pool = [[None] * block_size for _ in range(num_blocks)]

  def run(self, ops):
    srcs, dsts = [s for s, _ in ops], [d for _, d in ops]
    assert len(set(dsts)) == len(dsts), f"duplicate destinations {ops}"
    assert not set(srcs) & set(dsts), f"a block is both read and written {ops}"
    data = [list(self.pool[s]) for s in srcs]
    for d, x in zip(dsts, data):
      self.pool[d] = x

  def poison(self, blocks):
    for b in blocks:
      self.pool[b] = [POISON] * self.bs

  def write(self, table, pos, tag):
    self.pool[table[pos // self.bs]][pos % self.bs] = tag

  def read(self, table, pos):
    return self.pool[table[pos // self.bs]][pos % self.bs]


def tag(tokens, pos):
  # KV of position pos depends on the whole prefix.
  return tuple(tokens[:pos + 1])


# -- unit tests ---------------------------------------------------------------------------------


def test_constructor_validation_and_sizes():
  for args in [(1, 4, 4), (8, 0, 4), (8, 4, 0)]:
    with pytest.raises(ValueError):
      BlockPager(*args)
  with pytest.raises(ValueError):
    BlockPager(8, 4, 4, watermark_blocks=-1)
  p = BlockPager(10, 4, 4)
  assert (p.num_total_blocks, p.num_free_blocks, p.num_used_blocks) == (9, 9, 0)
  assert [p.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
  p.check_invariants()


def test_coalesce_runs():
  assert coalesce_runs([]) == []
  assert coalesce_runs([7]) == [(7, 0, 1)]
  assert coalesce_runs([3, 4, 5, 9, 10, 2, 8]) == [(3, 0, 3), (9, 3, 2), (2, 5, 1), (8, 6, 1)]
  assert coalesce_runs([5, 4]) == [(5, 0, 1), (4, 1, 1)]  # descending is not contiguous
  assert coalesce_runs((1, 2, 3)) == [(1, 0, 3)]


def test_allocate_contiguous_and_errors():
  p = BlockPager(20, 4, 4)
  assert p.allocate("a", list(range(10))) == 0
  t = p.block_table("a")
  assert len(t) == 3 and p.runs("a") == [(t[0], 0, 3)] and 0 not in t
  assert p.num_tokens("a") == 10 and p.has("a") and not p.has("b")
  assert p.num_used_blocks == 3 and p.num_free_blocks == 16
  with pytest.raises(ValueError):
    p.allocate("a", [1])  # duplicate
  with pytest.raises(ValueError):
    p.allocate("b", [])
  with pytest.raises(ValueError):
    p.allocate("b", list(range(17)))  # > max_blocks_per_seq * block_size
  p.allocate("b", list(range(16)))  # exactly the limit
  assert len(p.block_table("b")) == 4
  with pytest.raises(KeyError):
    p.num_tokens("zz")
  p.check_invariants()


def test_out_of_blocks_leaves_state_unchanged():
  p = BlockPager(6, 2, 8)  # 5 usable blocks
  p.allocate(0, [1] * 6)  # 3 blocks
  before = (p.num_free_blocks, p.block_table(0), p.stats())
  assert not p.can_allocate([2] * 6)
  with pytest.raises(OutOfBlocks):
    p.allocate(1, [2] * 6)
  assert not p.has(1) and (p.num_free_blocks, p.block_table(0), p.stats()) == before
  p.append(0, 3)  # 9 tokens: 5 blocks
  assert p.num_free_blocks == 0 and not p.can_append(0, 2)
  with pytest.raises(OutOfBlocks):
    p.append(0, 2)
  assert p.num_tokens(0) == 9
  p.append(0, 1)  # fills the last block without a new one
  assert p.num_tokens(0) == 10
  p.check_invariants()


def test_can_allocate_watermark_and_prefix_hits_count_as_free():
  p = BlockPager(9, 2, 8, watermark_blocks=2)  # 8 usable
  prompt = [1, 2, 3, 4, 5, 6, 7]  # 4 blocks
  assert p.can_allocate(prompt)
  p.allocate("a", prompt)
  p.commit_tokens("a", prompt)
  assert not p.can_allocate([9] * 7)  # 4 fresh blocks would leave 0 < watermark
  p.allocate("x", [9] * 7)  # allocate() itself only needs the blocks
  assert p.num_free_blocks == 0
  p.free("x")
  # Same prompt: 3 live shared blocks + 1 fresh -> 3 free after, >= watermark.
  assert p.can_allocate(prompt)
  assert not p.can_allocate([])
  assert not p.can_allocate([0] * 17)


def test_prefix_cache_hits_share_full_blocks():
  p = BlockPager(32, 4, 8)
  a = list(range(10))
  assert p.allocate("a", a) == 0
  assert p.allocate("b", a) == 0  # nothing committed yet
  p.commit_tokens("a", a)
  assert p.allocate("c", a + [99, 98]) == 8
  ta, tc = p.block_table("a"), p.block_table("c")
  assert tc[:2] == ta[:2] and tc[2] != ta[2]
  assert p.refcount(ta[0]) == 2 and p.refcount(ta[2]) == 1
  # A prompt of exactly k full blocks reuses k-1: at least one token is computed.
  assert p.allocate("d", a[:8]) == 4
  # Divergence in the second block stops the chain after the first.
  assert p.allocate("e", a[:4] + [0, 0, 0, 0, 1]) == 4
  # Same block content at another position does not hit (hash chains).
  assert p.allocate("f", [7, 7, 7, 7] + a[4:8] + [1]) == 0
  assert p.stats()["prefix_hit_blocks"] == 2 + 1 + 1
  p.check_invariants()


def test_prefix_cache_disabled():
  p = BlockPager(32, 4, 8, enable_prefix_cache=False)
  a = list(range(10))
  p.allocate("a", a)
  p.commit_tokens("a", a)
  assert p.allocate("b", a) == 0
  assert set(p.block_table("a")).isdisjoint(p.block_table("b"))
  assert p.stats()["cached"] == 0
  p.check_invariants()


def test_commit_tokens_only_hashes_written_full_blocks():
  p = BlockPager(32, 4, 8)
  a = list(range(12))
  p.allocate("a", a[:6])
  p.commit_tokens("a", a)  # only the first 6 tokens exist: one full block
  assert p.stats()["cached"] == 1
  p.commit_tokens("a", a[:3])  # shorter lists are fine
  p.append("a", 2)
  p.commit_tokens("a", a[:8])
  assert p.stats()["cached"] == 2
  assert p.allocate("b", a[:9]) == 8
  p.allocate("c", [5] * 8)
  p.fork("c", "d")
  p.commit_tokens("c", [5] * 8)  # hashes the blocks 'd' shares
  p.commit_tokens("d", [5] * 8)  # consistent: fine
  p.allocate("f", [6] * 8)
  p.fork("f", "g")
  p.commit_tokens("f", [6] * 8)
  with pytest.raises(ValueError):
    p.commit_tokens("g", [7] * 8)  # contradicts the shared blocks
  p.check_invariants()


def test_commit_tokens_accepts_numpy():
  p = BlockPager(32, 4, 8)
  a = np.arange(10, dtype=np.int32)
  p.allocate("a", a)
  p.commit_tokens("a", a)
  assert p.allocate("b", list(range(10))) == 8


def test_evictable_cache_survives_free_until_reallocated():
  p = BlockPager(8, 2, 8)  # 7 usable
  a = [1, 2, 3, 4, 5]
  p.allocate("a", a)
  p.commit_tokens("a", a)
  ta = p.block_table("a")
  p.free("a")
  s = p.stats()
  assert p.num_free_blocks == 7 and s["cached_evictable"] == 2 and s["cached"] == 2
  # Hashed blocks stay off the poison list; the partial block is poisonable.
  assert p.freed_since_last_call() == [ta[2]]
  assert p.allocate("b", a) == 4 and p.block_table("b")[:2] == ta[:2]
  p.free("b")
  p.freed_since_last_call()
  p.allocate("big", [9] * 14)  # takes every block: the cached ones are evicted
  assert p.stats()["cached"] == 0
  p.free("big")
  assert p.allocate("c", a) == 0
  p.check_invariants()


def test_append_fast_path_growth_and_errors():
  p = BlockPager(40, 4, 4)
  p.allocate("a", [1, 2, 3])
  t = p.block_table("a")
  assert p.append("a") == [] and p.block_table("a") == t  # fills the block
  assert p.append("a") == []  # new block, right after the last
  assert p.block_table("a") == [t[0], t[0] + 1] and p.num_tokens("a") == 5
  assert p.append("a", 0) == [] and p.num_tokens("a") == 5
  assert p.append("a", 7) == [] and p.runs("a") == [(t[0], 0, 3)]
  with pytest.raises(ValueError):
    p.append("a", -1)
  assert p.can_append("a", 4) and not p.can_append("a", 5)
  with pytest.raises(ValueError):
    p.append("a", 5)  # past max_blocks_per_seq * block_size
  assert p.num_tokens("a") == 12
  with pytest.raises(KeyError):
    p.append("nope")
  p.check_invariants()


def test_growth_takes_next_block_or_jumps_leaving_room():
  p = BlockPager(64, 2, 16)
  p.allocate("a", [1, 2])
  p.allocate("b", [3, 4])  # a's run has a live tail: b lands away from it
  ta, tb = p.block_table("a"), p.block_table("b")
  assert tb[0] > ta[0] + 1
  for _ in range(3):
    p.append("a", 2)
    p.append("b", 2)
  assert len(p.runs("a")) == 1 and len(p.runs("b")) == 1
  p.check_invariants()


def test_fork_and_copy_on_write():
  p = BlockPager(32, 4, 8)
  p.allocate("a", list(range(6)))  # last block half full
  p.fork("a", "b")
  ta = p.block_table("a")
  assert p.block_table("b") == ta and p.num_tokens("b") == 6
  assert all(p.refcount(b) == 2 for b in ta)
  with pytest.raises(ValueError):
    p.fork("a", "b")
  with pytest.raises(KeyError):
    p.fork("zz", "c")
  copies = p.append("b")
  tb = p.block_table("b")
  assert copies == [(ta[1], tb[1])] and tb[0] == ta[0] and tb[1] != ta[1]
  assert p.refcount(ta[1]) == 1 and p.refcount(ta[0]) == 2
  assert p.append("a") == []  # now sole owner: writes in place
  assert p.block_table("a") == ta
  assert p.stats()["copies"] == 1 and p.stats()["shared"] == 1
  # A full shared last block needs no copy.
  p.allocate("c", list(range(8)))
  p.fork("c", "d")
  assert p.append("d") == [] and p.block_table("d")[0] == p.block_table("c")[0]
  p.check_invariants()


def test_blocks_of_pending_copies_are_held_until_the_round_ends():
  p = BlockPager(8, 2, 8, enable_prefix_cache=False)  # 7 usable
  p.allocate("a", [1, 2, 3])
  p.plan_compaction(1, 0)
  p.fork("a", "b")
  (src, dst), = p.append("b", 1)
  p.free("b")  # dst is freed before its copy ran: not reusable this round
  assert p.stats()["held"] == 1 and p.num_free_blocks == 4 and p.num_used_blocks == 3
  assert dst not in p.freed_since_last_call()
  p.allocate("c", [0] * 8)  # every free block
  assert dst not in p.block_table("c")
  with pytest.raises(OutOfBlocks):
    p.append("c", 1)
  p.check_invariants()
  assert p.plan_compaction(1, 8) == []  # ends the round
  assert p.stats()["held"] == 0 and p.num_free_blocks == 1 and p.freed_since_last_call() == [dst]
  p.check_invariants()


def test_prefix_hit_on_a_held_block():
  p = BlockPager(32, 2, 8)
  p.allocate("a", [1, 2, 3])
  p.fork("a", "b")
  x, y = p.block_table("a")
  p.append("b", 1)  # copy-on-write of y
  p.append("a", 1)  # 'a' now owns y alone and fills it
  p.commit_tokens("a", [1, 2, 3, 4])
  p.free("a")
  assert p.stats()["held"] == 1
  assert p.allocate("c", [1, 2, 3, 4, 5]) == 4 and p.block_table("c")[:2] == [x, y]
  assert p.stats()["held"] == 0
  p.check_invariants()


def test_free_refcounts_and_freed_since_last_call():
  p = BlockPager(32, 4, 8, enable_prefix_cache=False)
  p.allocate("a", list(range(9)))
  p.fork("a", "b")
  ta = p.block_table("a")
  p.free("a")
  assert p.freed_since_last_call() == [] and p.num_used_blocks == 3
  p.free("b")
  assert p.freed_since_last_call() == sorted(ta) and p.freed_since_last_call() == []
  assert p.num_free_blocks == p.num_total_blocks
  with pytest.raises(KeyError):
    p.free("b")
  # Freed then reused before the call: not reported (it is not free).
  p.allocate("c", [1])
  tc = p.block_table("c")
  p.free("c")
  p.allocate("d", [1])
  assert p.block_table("d") == tc and p.freed_since_last_call() == []
  p.check_invariants()


def test_stats_keys():
  p = BlockPager(16, 4, 4)
  p.allocate("a", [1] * 5)
  s = p.stats()
  for k in ("free", "used", "shared", "cached_evictable", "runs_mean", "runs_max", "prefix_hit_blocks"):
    assert k in s
  assert s["free"] + s["used"] == s["total"] == 15 and s["runs_max"] == 1 and s["runs_mean"] == 1.0


def test_check_invariants_catches_corruption():
  p = BlockPager(16, 4, 4)
  p.allocate("a", [1] * 5)
  p.check_invariants()
  p._ref[p.block_table("a")[0]] += 1
  with pytest.raises(AssertionError):
    p.check_invariants()
  q = BlockPager(16, 4, 4)
  q.allocate("a", [1] * 5)
  q._seqs["a"].table[0] = 0
  with pytest.raises(AssertionError):
    q.check_invariants()


def make_fragmented(p, seqs=("a", "b"), blocks_each=5):
  # Fill the pool with one-block sequences, free those on odd blocks, grow `seqs` through those
  # one-block holes (one run per block), then free the fillers.
  i = 0
  while p.num_free_blocks:
    p.allocate(("f", i), [0])
    i += 1
  fillers = [s for s in p.seq_ids() if p.block_table(s)[0] % 2 == 0]
  for s in p.seq_ids():
    if p.block_table(s)[0] % 2:
      p.free(s)
  for s in seqs:
    p.allocate(s, [1] * p.block_size)
  for _ in range(blocks_each - 1):
    for s in seqs:
      p.append(s, p.block_size)
  for s in fillers:
    p.free(s)
  p.freed_since_last_call()
  for s in seqs:
    assert len(p.runs(s)) == blocks_each


def test_plan_compaction_merges_runs_and_reports_freed():
  p = BlockPager(64, 2, 16, enable_prefix_cache=False)
  make_fragmented(p, ("a", "b", "c"))
  p.check_invariants()
  assert p.plan_compaction(max_groups=1, max_moves=0) == []
  with pytest.raises(ValueError):
    p.plan_compaction(0, 4)
  with pytest.raises(ValueError):
    p.plan_compaction(1, -1)
  refs = [p.refcount(b) for b in range(64)]
  tables = {s: p.block_table(s) for s in p.seq_ids()}
  moves = p.plan_compaction(max_groups=1, max_moves=64)
  srcs, dsts = [s for s, _ in moves], [d for _, d in moves]
  assert len(set(dsts)) == len(dsts) and not set(srcs) & set(dsts)
  assert all(refs[s] == 1 and refs[d] == 0 for s, d in moves)
  freed = p.freed_since_last_call()
  assert set(srcs) <= set(freed) and all(p.refcount(b) == 0 for b in freed)
  assert all(len(p.runs(s)) == 1 for s in p.seq_ids())
  # The tables changed exactly by the moves.
  where = dict(moves)
  for s, t in tables.items():
    assert p.block_table(s) == [where.get(b, b) for b in t]
  assert p.stats()["moves"] == len(moves) and p.stats()["runs_max"] == 1
  assert p.plan_compaction(1, 64) == []
  p.check_invariants()


def test_plan_compaction_never_moves_shared_blocks_or_pending_copies():
  p = BlockPager(40, 2, 16, enable_prefix_cache=False)
  make_fragmented(p)
  p.fork("a", "a2")  # every block of 'a' is shared now
  shared = set(p.block_table("a"))
  moves = p.plan_compaction(1, 100)
  assert moves and not shared & {s for s, _ in moves}  # only b's blocks move
  assert p.block_table("a") == p.block_table("a2") and set(p.block_table("a")) == shared
  p.free("a2")
  p.append("b", 1)  # last block of 'b' is partial now
  p.plan_compaction(1, 0)  # round boundary
  p.fork("b", "b2")
  copies = p.append("b", 1)  # copy-on-write of the shared partial block
  assert len(copies) == 1
  moves = p.plan_compaction(1, 100)
  # b's only unshared block is the copy destination, whose copy has not run yet.
  assert copies[0][1] not in {s for s, _ in moves}
  assert not set(p.block_table("b2")) & {s for s, _ in moves}
  p.check_invariants()


def test_plan_compaction_budget_and_convergence_over_calls():
  p = BlockPager(40, 2, 16, enable_prefix_cache=False)
  make_fragmented(p, blocks_each=8)
  calls = 0
  while True:
    moves = p.plan_compaction(max_groups=1, max_moves=3)
    assert len(moves) <= 3
    p.check_invariants()
    if not moves:
      break
    calls += 1
    assert calls < 50
  assert len(p.runs("a")) == len(p.runs("b")) == 1 and calls > 4


# -- fragmented workload --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fragmented_workload_compacts_to_max_groups(seed):
  rng = random.Random(seed)
  bs, nb, max_groups, max_moves = 4, 401, 2, 8
  p = BlockPager(nb, bs, 48, enable_prefix_cache=False)
  dev = Device(nb, bs)
  toks = {}

  def write(sid, start):
    t = p.block_table(sid)
    for pos in range(start, len(toks[sid])):
      dev.write(t, pos, (sid, pos))

  # Fill the pool with many sequences growing interleaved, 1-3 tokens at a time.
  sid = 0
  while p.num_free_blocks > 8:
    if len(toks) < 40:
      toks[sid] = [0] * rng.randint(1, 8)
      p.allocate(sid, toks[sid])
      write(sid, 0)
      sid += 1
    s = rng.choice(list(toks))
    k = rng.randint(1, 3)
    if p.num_tokens(s) + k > p.max_tokens:
      continue
    dev.run(p.append(s, k))
    n = len(toks[s])
    toks[s] += [0] * k
    write(s, n)
  worst = max(len(p.runs(s)) for s in toks)
  # Free half the sequences: space for the rest to compact into.
  for s in list(toks)[::2]:
    p.free(s)
    del toks[s]
  dev.poison(p.freed_since_last_call())
  for _ in range(200):
    moves = p.plan_compaction(max_groups, max_moves)
    assert len(moves) <= max_moves
    dev.run(moves)
    dev.poison(p.freed_since_last_call())
    if not moves:
      break
  p.check_invariants()
  runs = {s: len(p.runs(s)) for s in toks}
  assert worst > max_groups and max(runs.values()) <= max_groups, (worst, runs)
  for s, t in toks.items():
    table = p.block_table(s)
    assert [dev.read(table, pos) for pos in range(len(t))] == [(s, pos) for pos in range(len(t))]


# -- state machine ------------------------------------------------------------------------------

BASE = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0,
        1, 0, 0, 1, 1, 0, 1, 1, 0, 1]  # shared "system prompt" so prefix hits are common


class PagerMachine(RuleBasedStateMachine):
  """Random allocate/append/commit/fork/free calls; `run_round` runs them on a fake device.

  A round follows the engine's contract: pager calls, then plan_compaction (sometimes skipped),
  then the device runs copies + moves as one batch (all reads before writes), poisons freed
  blocks, and writes the round's new KV. Every token's KV tag is its whole prefix, so any wrong
  share, copy, move, poison or leak shows.
  """

  @initialize(bs=st.sampled_from([1, 2, 4]), nb=st.sampled_from([2, 3, 5, 8] + list(range(12, 49))),
              mbps=st.integers(1, 12), wm=st.integers(0, 3), cache=st.booleans(),
              prompts=st.lists(st.tuples(st.integers(0, 14), st.lists(st.integers(0, 1), max_size=4)),
                               max_size=6))
  def init(self, bs, nb, mbps, wm, cache, prompts):
    self.bs, self.nb = bs, nb
    self.p = BlockPager(nb, bs, mbps, watermark_blocks=wm, enable_prefix_cache=cache)
    self.dev = Device(nb, bs)
    self.toks = {}  # seq -> tokens (KV slots)
    self.written = {}  # seq -> tokens whose KV is on the device
    self.copies = []  # this round's copy-on-write copies
    self.next_id = 0
    for k, tail in prompts:  # start with a few live sequences
      self.allocate(k, tail)
    self.run_round(1, 1, 0, True)

  def seqs(self):
    return sorted(self.toks)

  def pick(self, data, cands):
    # A random element of cands, or None (rules do nothing then rather than being skipped).
    cands = sorted(cands)
    return data.draw(st.sampled_from(cands)) if cands else None

  @rule(k=st.integers(0, 14), tail=st.lists(st.integers(0, 1), max_size=4))
  def allocate(self, k, tail):
    prompt = BASE[:k] + tail
    sid, self.next_id = self.next_id, self.next_id + 1
    p = self.p
    can, free = p.can_allocate(prompt), p.num_free_blocks
    if not prompt or len(prompt) > p.max_tokens:
      with pytest.raises(ValueError):
        p.allocate(sid, prompt)
      assert not can
      return
    try:
      cached = p.allocate(sid, prompt)
    except OutOfBlocks:
      assert not can and p.num_free_blocks == free and not p.has(sid)
      event("allocate: out of blocks")
      return
    assert can or p.num_free_blocks < p.watermark_blocks
    event(f"prefix hit blocks: {min(cached // self.bs, 3)}")
    assert cached % self.bs == 0 and 0 <= cached < len(prompt)
    if not p.enable_prefix_cache:
      assert cached == 0
    table = p.block_table(sid)
    for pos in range(cached):  # shared KV must already be there
      assert self.dev.read(table, pos) == tag(prompt, pos)
    self.toks[sid], self.written[sid] = list(prompt), cached

  @rule(parity=st.integers(0, 1), grow=st.integers(1, 4), keep=st.integers(0, 2))
  def fragment(self, parity, grow, keep):
    # Fill the pool with one-block fillers, free every other one, grow the other sequences
    # through the holes (one run per new block), then free most fillers: compaction has work.
    fillers = []
    while self.p.num_free_blocks:
      sid, self.next_id = self.next_id, self.next_id + 1
      self.p.allocate(sid, [1])
      self.toks[sid], self.written[sid] = [1], 0
      fillers.append(sid)
    for sid in fillers:
      if self.p.block_table(sid)[0] % 2 == parity:
        self.free_seq(sid)
    growing = [s for s in self.seqs() if s not in fillers]
    for _ in range(grow):
      for sid in growing:
        if self.p.can_append(sid, self.bs):
          self.append_tokens(sid, [0] * self.bs)
    for i, sid in enumerate(fillers):
      if sid in self.toks and i % 3 >= keep:
        self.free_seq(sid)

  def append_tokens(self, sid, new):
    copies = self.p.append(sid, len(new))
    if copies:
      event("append: copy-on-write")
    self.copies += copies
    self.toks[sid] += new

  def free_seq(self, sid):
    self.p.free(sid)
    del self.toks[sid], self.written[sid]

  @rule(data=st.data(), k=st.integers(0, 6))
  def append(self, data, k):
    sid = self.pick(data, self.toks)
    if sid is None:
      return
    new = data.draw(st.lists(st.integers(0, 1), min_size=k, max_size=k))
    p, n = self.p, len(self.toks[sid])
    can, free, table = p.can_append(sid, k), p.num_free_blocks, p.block_table(sid)
    try:
      copies = p.append(sid, k)
    except (ValueError, OutOfBlocks) as e:
      assert not can
      assert isinstance(e, ValueError) == (n + k > p.max_tokens)
      assert (p.num_free_blocks, p.block_table(sid), p.num_tokens(sid)) == (free, table, n)
      return
    assert can
    if copies:
      assert len(copies) == 1 and copies[0][0] == table[-1] and n % self.bs
      event("append: copy-on-write")
    self.copies += copies
    self.toks[sid] += new

  @rule(data=st.data())
  def decode(self, data):
    # Every sequence grows by one token (an engine decode step): interleaved growth fragments.
    for sid in self.seqs():
      if self.p.can_append(sid, 1):
        self.append_tokens(sid, [data.draw(st.integers(0, 1))])

  @rule(data=st.data())
  def commit(self, data):
    sid = self.pick(data, self.toks)
    if sid is None:
      return
    upto = data.draw(st.integers(0, self.written[sid]))
    self.p.commit_tokens(sid, self.toks[sid][:upto])

  @rule(data=st.data(), grow=st.integers(0, 2))
  def fork(self, data, grow):
    # Only a parent whose KV is on the device (as the engine forks after prefill); then maybe
    # one token for the child or the parent (copy-on-write when the last block is partial).
    parent = self.pick(data, [s for s in self.toks if self.written[s] == len(self.toks[s])])
    if parent is None:
      return
    child, self.next_id = self.next_id, self.next_id + 1
    self.p.fork(parent, child)
    assert self.p.block_table(child) == self.p.block_table(parent)
    self.toks[child], self.written[child] = list(self.toks[parent]), self.written[parent]
    sid = (None, child, parent)[grow]
    if sid is not None and self.p.can_append(sid, 1):
      self.append_tokens(sid, [data.draw(st.integers(0, 1))])

  @rule(data=st.data())
  def free(self, data):
    sid = self.pick(data, self.toks)
    if sid is not None:
      self.free_seq(sid)

  @rule(parity=st.integers(0, 1))
  def free_half(self, parity):
    for sid in self.seqs():
      if sid % 2 == parity:
        self.free_seq(sid)

  @rule(compact=st.integers(0, 3), max_groups=st.integers(1, 3), max_moves=st.integers(0, 6),
        commit=st.booleans())
  def run_round(self, compact, max_groups, max_moves, commit):
    # compact == 0: no plan_compaction() call (the round does not end; pinned blocks stay so).
    p = self.p
    refs = [p.refcount(b) for b in range(self.nb)]
    event(f"step: max runs {min(p.stats()['runs_max'], 4)}")
    event(f"step: seqs {min(len(self.toks), 5)}")
    moves = p.plan_compaction(max_groups, max_moves) if compact else []
    assert len(moves) <= max_moves
    event(f"step: moves {min(len(moves), 3)}")
    for s, d in moves:
      assert refs[s] == 1 and refs[d] == 0 and d != 0 and s != 0
    self.dev.run(self.copies + moves)
    freed = p.freed_since_last_call()
    assert {s for s, _ in moves} <= set(freed)
    assert all(p.refcount(b) == 0 and b != 0 for b in freed)
    self.dev.poison(freed)
    for sid, t in self.toks.items():
      table = p.block_table(sid)
      for pos in range(self.written[sid], len(t)):
        self.dev.write(table, pos, tag(t, pos))
      self.written[sid] = len(t)
      if commit:
        p.commit_tokens(sid, t)
    self.copies = []
    for sid, t in self.toks.items():  # every token's KV is where the table says
      table = p.block_table(sid)
      assert [self.dev.read(table, pos) for pos in range(len(t))] == [tag(t, pos) for pos in range(len(t))]

  @invariant()
  def consistent(self):
    p = self.p
    p.check_invariants()
    assert set(p.seq_ids()) == set(self.toks)
    assert p.num_free_blocks + p.num_used_blocks == p.num_total_blocks == self.nb - 1
    owners = [0] * self.nb
    for sid, t in self.toks.items():
      table = p.block_table(sid)
      assert p.num_tokens(sid) == len(t) and len(table) == p.blocks_needed(len(t))
      assert all(1 <= b < self.nb for b in table)
      check_runs(p.runs(sid), table)
      for b in table:
        owners[b] += 1
    assert owners[0] == 0
    assert all(owners[b] == p.refcount(b) for b in range(self.nb))
    assert p.num_used_blocks == sum(1 for c in owners if c) + p.stats()["held"]

  def teardown(self):
    if not hasattr(self, "p"):
      return
    for sid in self.seqs():
      self.p.free(sid)
    self.p.plan_compaction(1, 0)  # ends the round: held blocks come back
    self.p.check_invariants()
    assert self.p.num_free_blocks == self.p.num_total_blocks and self.p.num_used_blocks == 0


TestPagerMachine = PagerMachine.TestCase
TestPagerMachine.settings = settings(max_examples=400, stateful_step_count=50, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


# -- host timing (printed, never asserted) --------------------------------------------------------


def _time_appends(num_seqs=256, block_size=16, steps=500, repeats=5):
  # Best of `repeats`: us per step for num_seqs append(seq, 1) calls (1 in 16 takes a new block).
  best = float("inf")
  for r in range(repeats):
    p = BlockPager(num_seqs * 64 + 1, block_size, 64)
    rng = random.Random(r)
    for s in range(num_seqs):
      p.allocate(s, [rng.randrange(1000) for _ in range(rng.randint(1, 400))])
    t0 = time.perf_counter()
    for _ in range(steps):
      for s in range(num_seqs):
        p.append(s, 1)
    best = min(best, (time.perf_counter() - t0) / steps * 1e6)
  return best


if __name__ == "__main__":
  print(f"append() of 256 sequences, one token each: {_time_appends():.1f} us per step")


def test_drop_blocks_frees_middle_blocks_and_keeps_invariants():
  pg = BlockPager(num_blocks=32, block_size=4, max_blocks_per_seq=16)
  pg.allocate("a", list(range(1, 23)))  # 22 tokens: 6 blocks, the last one partial
  table = pg.block_table("a")
  free0 = pg.num_free_blocks
  removed = pg.drop_blocks("a", 1, 3)
  assert removed == table[1:4]
  assert pg.block_table("a") == table[:1] + table[4:]
  assert pg.num_tokens("a") == 22 - 12 and pg.num_free_blocks == free0 + 3
  pg.check_invariants()
  pg.append("a", 3)  # growth continues from the shortened table
  pg.check_invariants()
  with pytest.raises(ValueError):
    pg.drop_blocks("a", 0, len(pg.block_table("a")))  # the last block stays
  pg.free("a")
  pg.check_invariants()
  assert pg.num_free_blocks == pg.num_total_blocks
