"""The host memory tier (kvrm_jax/tier.py): placement of cold blocks on host extents and swap
preemption on a tiny random model against a dense greedy reference, plus the tier's units.

Compiles dominate the run time on CPU, so engines are built once per runtime config (module-scoped
`engine`) and reused by several tests; `run` resets their stats and checks the pager and tier
invariants after every step.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, needs_devices, random_prompts

from kvrm_jax.config import RuntimeConfig
from kvrm_jax.engine import Engine
from kvrm_jax.model import llama as model_lib
from kvrm_jax.model import reference
from kvrm_jax.sched import tier
from kvrm_jax.sched.request import SamplingParams
from kvrm_jax.sched.stats import EngineStats
from kvrm_jax.sched.summaries import SummaryConfig
from kvrm_jax.step import sharding
from pallas_kernels.partition import merge_lse

CFG = TINY
BASE = dict(block_size=8, max_slots=4, max_blocks_per_seq=16, max_groups=2, max_moves=4, prefill_buckets=(32,))
# The device pool (14 usable blocks) is too small for the mixed workload.
RT_OFF = RuntimeConfig(num_blocks=15, **BASE)
RT_PLACE = RuntimeConfig(num_blocks=15, host_blocks=64, host_extent=2, max_swap_extents=8, max_host_reads=8,
                         max_host_blocks_per_seq=8, debug_poison_freed=True, **BASE)
RT_SWAP = RuntimeConfig(num_blocks=15, host_blocks=64, host_extent=4, max_swap_extents=8, debug_poison_freed=True,
                        **BASE)
RT_SWAP1 = dataclasses.replace(RT_SWAP, host_extent=1, max_swap_extents=32)
# Tight tier budgets: 3 extents swapped per step, 2 host reads, 4 host blocks per sequence.
RT_TIGHT = RuntimeConfig(block_size=8, num_blocks=9, max_slots=4, max_blocks_per_seq=16, max_groups=2, max_moves=4,
                         prefill_buckets=(32,), host_blocks=32, host_extent=2, max_swap_extents=3, max_host_reads=2,
                         max_host_blocks_per_seq=4)


prompts = random_prompts


def dense_greedy(model, ps, news, eos_ids=()):
  """Greedy continuations from the dense causal forward (no cache, no pager), all prompts at once:
  each is padded to one length (causal, so padding never changes a real position's logits)."""
  graphdef, state = model_lib.split(model)
  t = -(-max(len(p) + n for p, n in zip(ps, news)) // 32) * 32

  def attend(layer, q, k, v, cache):
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    return model_lib.attention(q[None], k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None], mask)[0], cache

  @jax.jit
  def next_tokens(ids, last):
    def one(ids, last):
      logits, _ = model_lib.merge(graphdef, state)(ids, jnp.arange(t, dtype=jnp.int32), None, attend)
      return jnp.argmax(logits[last])
    return jax.vmap(one)(ids, last)

  ids = np.zeros((len(ps), t), np.int32)
  for i, p in enumerate(ps):
    ids[i, :len(p)] = p
  n = np.array([len(p) for p in ps])
  outs, live = [[] for _ in ps], np.ones(len(ps), bool)
  for _ in range(max(news)):
    tok = np.asarray(next_tokens(ids, n - 1))
    for i in np.flatnonzero(live):
      outs[i].append(int(tok[i]))
      ids[i, n[i]] = tok[i]
      live[i] = len(outs[i]) < news[i] and int(tok[i]) not in eos_ids
    n = n + live
  return outs


@pytest.fixture(scope="module")
def mixed(model):
  """test_engine's mixed workload (7 prompts on 4 slots, one of 70 tokens) and its reference."""
  ps = prompts(0, (5, 17, 40, 3, 70, 16, 9))
  news = [20, 7, 13, 20, 5, 11, 16]
  return ps, [SamplingParams(max_new_tokens=n) for n in news], dense_greedy(model, ps, news, CFG.eos_ids)


@pytest.fixture(scope="module")
def engine(model):
  """engine(rt, policy): one Engine per (rt, policy), built on first use and shared by the tests."""
  @functools.cache
  def get(rt, policy):
    return Engine(CFG, model, rt, tier_policy=policy)
  return lambda rt, policy="recency": get(rt, policy)


def check(eng):
  eng.sched.allocator.check_invariants()
  if eng.sched.tier is not None:
    eng.sched.tier.check_invariants()


def run(eng, ps, sps, max_steps=2000):
  """Fresh stats, the requests through to the end (invariants checked every step) -> outputs, stats."""
  eng.stats = EngineStats()
  rids = [eng.add_request(p, sp) for p, sp in zip(ps, sps)]
  for _ in range(max_steps):
    if not eng.has_work():
      break
    eng.step()
    check(eng)
  assert not eng.has_work(), "the engine stopped making progress"
  return [eng.requests[r].output_ids for r in rids], eng.stats


def step_until(eng, rids, pred, max_steps=200):
  """Step (invariants checked) until some request of rids satisfies pred; returns its id or None."""
  for _ in range(max_steps):
    eng.step()
    check(eng)
    found = next((r for r in rids if pred(eng.requests[r])), None)
    if found is not None:
      return found
  return None


def assert_whole(eng):
  """The device pool and the host tier are free again, every extent accounted."""
  assert eng.sched.allocator.num_free_blocks == eng.sched.allocator.num_total_blocks
  eng.sched.allocator.check_invariants()
  t = eng.sched.tier
  t.check_invariants()
  assert not t.records and t.num_free_extents == t.num_extents - 1 and t.num_used_blocks == 0


# ----------------------------------------------------------------------------- placement


@pytest.fixture(scope="module")
def placed(engine, mixed):
  """The mixed workload through the placement engine, for each policy."""
  ps, sps, _ = mixed
  return {p: run(engine(RT_PLACE, p), ps, sps) for p in tier.POLICIES}


def test_dense_reference_matches_reference_module(model):
  """The padded, batched dense_greedy agrees with kvrm_jax.model.reference (logits and tokens)."""
  p = prompts(20, (6,))[0]
  assert dense_greedy(model, [p], [2]) == [reference.greedy_generate(model, p, 2)]
  ids = np.asarray(p + [0] * 26, np.int32)
  padded = reference.forward_logits(model, ids)[:6]
  np.testing.assert_allclose(padded, reference.forward_logits(model, p), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", tier.POLICIES)
def test_placement_matches_dense_reference(engine, mixed, placed, policy):
  """Cold blocks kept on host extents and attended from there: same greedy tokens, one decode
  executable, device pool and host tier whole at the end."""
  _, _, ref = mixed
  outs, st = placed[policy]
  eng = engine(RT_PLACE, policy)
  assert outs == ref
  assert st.placed_blocks > 0 and st.swap_out_extents > 0
  assert max(t[2] for t in st.tier_series) > 0  # the decode step really staged host extents
  assert eng.compiles.decode == 1
  assert_whole(eng)
  assert bool(jnp.isnan(eng.k_pool).any())  # freed blocks were poisoned


def test_placement_avoids_recompute_preemptions(engine, mixed, placed):
  """Without the tier the same small pool preempts (recompute) more than with placement."""
  ps, sps, ref = mixed
  outs, st = run(engine(RT_OFF), ps, sps)
  assert outs == ref
  assert st.preemptions > max(s.preemptions for _, s in placed.values())


# ----------------------------------------------------------------------------- swap preemption


@pytest.fixture(scope="module")
def swapped(engine, mixed):
  ps, sps, _ = mixed
  return run(engine(RT_SWAP), ps, sps)


def test_swap_preemption_matches_dense_reference(engine, mixed, swapped):
  """Preempted running requests go to host extents and come back instead of recomputing."""
  outs, st = swapped
  assert outs == mixed[2]
  assert st.swap_preemptions > 0 and st.swap_out_extents > 0 and st.swap_in_extents > 0
  assert st.placed_blocks == 0
  eng = engine(RT_SWAP)
  assert eng.compiles.decode == 1
  assert_whole(eng)


def test_swap_min_tokens_falls_back_to_recompute(engine, mixed):
  """Requests shorter than swap_min_tokens are recomputed, not swapped: same tokens."""
  ps, sps, ref = mixed
  eng = engine(RT_SWAP)
  eng.sched.swap_min_tokens = 10**6
  try:
    outs, st = run(eng, ps, sps)
  finally:
    eng.sched.swap_min_tokens = 0
  assert outs == ref
  assert st.preemptions > 0 and st.swap_preemptions == 0 and st.swap_out_extents == st.swap_in_extents == 0
  assert_whole(eng)


def test_block_by_block_extents_same_tokens_more_transfers(engine, mixed, swapped):
  """host_extent=1 moves the same blocks in more (smaller) copies than host_extent=4."""
  ps, sps, ref = mixed
  outs, st = run(engine(RT_SWAP1), ps, sps)
  assert outs == ref == swapped[0]
  assert st.swap_preemptions == swapped[1].swap_preemptions
  assert st.swap_out_extents > swapped[1].swap_out_extents
  assert_whole(engine(RT_SWAP1))


# ----------------------------------------------------------------------------- backends and meshes


@pytest.mark.parametrize("step_tokens", [0, 2 + 2 * 8])
def test_pallas_interpret_path_with_placement(model, step_tokens):
  """The Pallas kernel path (interpret mode) merges the host part exactly too, with separate
  prefill calls and with mixed steps (decode rows through the kernel beside prompt tiles)."""
  ps = prompts(8, (19, 5))
  news = [10, 10]
  rt = RuntimeConfig(block_size=8, num_blocks=6, max_slots=2, max_blocks_per_seq=4, max_groups=2, max_moves=2,
                     prefill_buckets=(32,), attention="interpret", host_blocks=8, host_extent=2, max_swap_extents=2,
                     max_host_reads=2, max_host_blocks_per_seq=2, step_tokens=step_tokens, tile=8,
                     prompt_attention="kernel")
  eng = Engine(CFG, model, rt)
  outs, st = run(eng, ps, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in news])
  assert outs == dense_greedy(model, ps, news)
  assert st.placed_blocks > 0 and (st.mixed_steps > 0) == bool(step_tokens)
  assert_whole(eng)


@pytest.mark.skipif(bool(needs_devices(2)), reason=str(needs_devices(2)))
def test_two_device_mesh_with_tier(model, mixed):
  """tp=2: host pools sharded over KV heads like the device pool; placement and swaps still exact."""
  ps, sps, ref = mixed
  eng = Engine(CFG, model, RT_PLACE, mesh=sharding.make_mesh(2))
  assert eng.k_host.sharding.spec == sharding.HOST_POOL_SPEC and len(eng.k_host.addressable_shards) == 2
  outs, st = run(eng, ps, sps)
  assert outs == ref
  assert st.placed_blocks > 0
  assert eng.compiles.decode == 1
  assert_whole(eng)


# ----------------------------------------------------------------------------- abort


def abort_and_finish(eng, rids, ref, victim):
  """Abort `victim`: its host extents are free at once; the others then finish exactly and both tiers
  are whole."""
  free, held = eng.sched.tier.num_free_extents, len(eng.sched.tier.records[victim].extents)
  assert eng.abort(victim)
  assert victim not in eng.sched.tier.records and eng.sched.tier.num_free_extents == free + held
  check(eng)
  while eng.has_work():
    eng.step()
    check(eng)
  for r, out in zip(rids, ref):
    if r != victim:
      assert eng.requests[r].output_ids == out
  assert_whole(eng)


def test_abort_swapped_out_request_frees_its_extents(engine, mixed):
  """A request aborted while swapped out gives its extents back; the others finish exactly."""
  ps, sps, ref = mixed
  eng = engine(RT_SWAP)
  eng.stats = EngineStats()
  rids = [eng.add_request(p, sp) for p, sp in zip(ps, sps)]
  victim = step_until(eng, rids, lambda r: r.swapped)
  assert victim is not None, "no request was swapped out"
  abort_and_finish(eng, rids, ref, victim)
  assert eng.requests[victim].finish_reason == "aborted"


def test_abort_running_request_with_placed_blocks(engine, mixed):
  """A running request with blocks on the host: abort frees both tiers at once."""
  ps, sps, ref = mixed
  eng = engine(RT_PLACE)
  eng.stats = EngineStats()
  rids = [eng.add_request(p, sp) for p, sp in zip(ps, sps)]
  victim = step_until(eng, rids, lambda r: r.slot is not None and eng.sched.slots.host[r.slot] and not r.done)
  assert victim is not None, "no block was placed"
  req = eng.requests[victim]
  assert req.slot is not None and victim in eng.sched.tier.records
  abort_and_finish(eng, rids, ref, victim)
  assert req.slot is None and not eng.sched.allocator.has(victim)


# ----------------------------------------------------------------------------- soak


SOAKS = {"place": RT_PLACE, "swap": RT_SWAP,
         "place-mixed": dataclasses.replace(RT_PLACE, step_tokens=RT_PLACE.max_slots + 4 * 8, tile=8)}


@pytest.fixture(scope="module")
def soak(request, engine):
  """150 random requests (prompts 1-60 tokens, 1-30 forced-length outputs) arriving over time, a few
  aborted at random steps, through the placement (+ swap) or the swap-only engine with freed
  blocks NaN-poisoned; invariants of both tiers after every step."""
  rng = np.random.default_rng(7)
  n = 150
  ps = [[int(t) for t in rng.integers(3, CFG.vocab_size, rng.integers(1, 61))] for _ in range(n)]
  news = [int(x) for x in rng.integers(1, 31, n)]
  eng = engine(SOAKS[request.param])
  eng.stats = EngineStats()
  rids = []
  aborted = set()
  steps = 0
  while len(rids) < n or eng.has_work():
    for _ in range(min(int(rng.integers(0, 4)), n - len(rids))):  # arrivals over time
      rids.append(eng.add_request(ps[len(rids)], SamplingParams(max_new_tokens=news[len(rids)], ignore_eos=True)))
    live = [r for r in rids if not eng.requests[r].done]
    if live and rng.random() < 0.04:
      r = int(rng.choice(live))
      assert eng.abort(r)
      aborted.add(r)
      check(eng)
    eng.step()
    check(eng)
    steps += 1
    assert steps < 5000, "the engine stopped making progress"
  return ps, news, rids, aborted, eng


@pytest.mark.parametrize("soak", list(SOAKS), indirect=True)
def test_soak_everything_accounted(soak):
  """Every request ends (length or aborted), both tiers are whole, one decode executable."""
  _, news, rids, aborted, eng = soak
  for r, n in zip(rids, news):
    req = eng.requests[r]
    assert req.done
    if r in aborted:
      assert req.finish_reason == "aborted" and len(req.output_ids) <= n
    else:
      assert req.finish_reason == "length" and len(req.output_ids) == n
  st = eng.stats
  print("soak:", len(aborted), "aborted,", st.preemptions, "preemptions,", st.swap_preemptions, "swapped,",
        st.placed_blocks, "placed blocks,", st.decode_steps, "steps")
  assert st.swap_preemptions > 0
  assert (st.placed_blocks > 0) == bool(eng.rt.max_host_reads)
  assert any(r in aborted and eng.requests[r].tiered for r in rids)  # aborts hit tiered requests too
  assert eng.compiles.decode == 1
  assert (eng.stats.mixed_steps > 0) == bool(eng.rt.step_tokens) and eng.compiles.mixed <= len(eng.rt.tile_buckets)
  assert_whole(eng)


@pytest.mark.parametrize(
    "soak", ["place", "swap", "place-mixed"], indirect=True)
def test_soak_outputs_match_dense_reference(model, soak):
  """With NaN-poisoned freed blocks the soak's tokens are the dense reference's (prefixes for the
  aborted requests)."""
  ps, news, rids, aborted, eng = soak
  ref = dense_greedy(model, ps, news)
  bad = [i for i, r in enumerate(rids) if eng.requests[r].output_ids != ref[i][:len(eng.requests[r].output_ids)]]
  assert not bad, f"{len(bad)} requests differ"


# ----------------------------------------------------------------------------- validation


def test_runtime_config_validation():
  """Host tier sizes that cannot work are refused."""
  with pytest.raises(ValueError, match="host tier"):
    RuntimeConfig(max_host_reads=4, max_host_blocks_per_seq=4)
  with pytest.raises(ValueError, match="host tier"):
    RuntimeConfig(max_swap_extents=4)
  with pytest.raises(ValueError, match="two extents"):
    RuntimeConfig(host_blocks=15, host_extent=8)
  with pytest.raises(ValueError, match="together"):
    RuntimeConfig(host_blocks=64, max_swap_extents=4, max_host_reads=4)
  with pytest.raises(ValueError, match="together"):
    RuntimeConfig(host_blocks=64, max_host_blocks_per_seq=4)
  with pytest.raises(ValueError):
    RuntimeConfig(host_blocks=64, host_extent=0)
  with pytest.raises(ValueError):
    RuntimeConfig(host_blocks=-1)
  assert RuntimeConfig(host_blocks=16, host_extent=8).host_extents == 2
  assert RuntimeConfig().host_extents == 0


def test_engine_validation(model):
  """The tier needs the kvrm engine, excludes far-history summaries, and knows its policies."""
  with pytest.raises(ValueError, match="kvrm"):
    Engine(CFG, model, RT_SWAP, kind="static")
  with pytest.raises(ValueError, match="policy"):
    Engine(CFG, model, RT_SWAP, tier_policy="lru")
  with pytest.raises(ValueError, match="summaries"):
    Engine(CFG, model, RT_SWAP, summaries=SummaryConfig(window=16, max_entries=2))


def test_engine_validation_summaries_on_existing_engine(engine):
  """Summaries cannot be switched on later, nor given per request."""
  eng = engine(RT_SWAP)
  with pytest.raises(ValueError, match="summaries"):
    eng.sched.summaries = SummaryConfig(window=16, max_entries=2)
  with pytest.raises(ValueError, match="summaries"):
    eng.add_request([5, 6, 7], SamplingParams(max_new_tokens=2), summaries=SummaryConfig(window=16, max_entries=2))
  assert eng.sched.summaries is None


# ----------------------------------------------------------------------------- units


def small_tier(host_blocks=16, host_extent=4):
  return tier.HostTier(RuntimeConfig(host_blocks=host_blocks, host_extent=host_extent))


def test_host_tier_store_take_free():
  """Extents are handed out whole, blocks numbered extent * host_extent + offset; free returns them."""
  t = small_tier()  # 4 extents, extent 0 reserved
  assert t.num_extents == 4 and t.num_free_extents == 3
  out = t.store(7, [11, 12, 13, 14, 15], placed=False)
  assert [blocks for _, blocks in out] == [[11, 12, 13, 14], [15]]
  exts = [e for e, _ in out]
  assert 0 not in exts and len(set(exts)) == 2 and t.num_free_extents == 1
  assert t.records[7].blocks == [exts[0] * 4 + i for i in range(4)] + [exts[1] * 4]
  assert t.num_used_blocks == 5 and t.num_used_extents == 2
  assert t.placed(7) == ([], [])
  with pytest.raises(tier.OutOfHostBlocks):
    t.store(8, [1, 2, 3, 4, 5], placed=False)
  assert 8 not in t.records and t.num_free_extents == 1  # nothing taken on failure
  t.check_invariants()
  t.free(7)
  t.free(7)  # idempotent
  assert not t.records and t.num_free_extents == 3
  t.check_invariants()


def test_host_tier_placed_then_swapped():
  """Placement records the leading blocks as placed; a later swap-out appends after them."""
  t = small_tier(host_blocks=32, host_extent=2)
  a = t.store(1, [5, 6], placed=True)
  b = t.store(1, [9], placed=True)
  ext, blocks = t.placed(1)
  assert ext == [a[0][0], b[0][0]] and len(blocks) == 3
  t.store(1, [3, 4, 8], placed=False)
  assert t.placed(1) == (ext, blocks) and len(t.records[1].blocks) == 6 and len(t.records[1].extents) == 4
  with pytest.raises(ValueError, match="swapped out"):
    t.store(1, [2], placed=True)
  t.check_invariants()
  rec = t.records[1]
  order, host_blocks = list(rec.extents), list(rec.blocks)
  extents, blocks = t.take(1)  # only the swapped part comes back; the placed part stays
  assert extents == order[2:] and blocks == host_blocks[3:]
  assert t.placed(1) == (ext, host_blocks[:3]) and t.records[1].extents == order[:2]
  t.check_invariants()
  assert t.untake(1) and t.records[1].extents == order and t.records[1].blocks == host_blocks
  assert not t.untake(1)
  t.check_invariants()


def test_host_tier_take_holds_extents_until_end_round():
  """Extents read by a swap-in this round are not reusable before end_round()."""
  t = small_tier()
  out = t.store(1, [11, 12, 13, 14, 15, 16], placed=False)
  extents, blocks = t.take(1)
  assert extents == [e for e, _ in out]
  assert blocks == [out[0][0] * 4 + i for i in range(4)] + [out[1][0] * 4 + i for i in range(2)]
  assert 1 not in t.records and t.num_free_extents == 1
  t.check_invariants()
  got = t.store(2, [1, 2, 3, 4], placed=False)
  assert got[0][0] not in [e for e, _ in out]  # the held extents are not handed out
  with pytest.raises(tier.OutOfHostBlocks):
    t.store(3, [1], placed=False)
  t.end_round()
  assert t.num_free_extents == 2
  t.check_invariants()
  assert t.take(99) == ([], [])


def test_pick_blocks_policies():
  """recency places the oldest blocks; attention the least attended (ties to the oldest)."""
  cands = np.arange(6)
  mass = np.array([0.5, 0.1, 0.3, 0.1, 0.9, 0.05, 2.0])  # index 6: the tail, not a candidate
  assert tier.pick_blocks("recency", cands, mass, 2).tolist() == [0, 1]
  assert tier.pick_blocks("recency", cands[::-1].copy(), None, 3).tolist() == [0, 1, 2]
  assert tier.pick_blocks("attention", cands, mass, 2).tolist() == [1, 5]
  assert tier.pick_blocks("attention", cands, mass, 3).tolist() == [1, 3, 5]
  assert tier.pick_blocks("attention", cands, None, 2).tolist() == [0, 1]  # no statistics yet
  assert tier.pick_blocks("attention", np.array([4, 2, 0]), mass, 1).tolist() == [2]


@pytest.mark.parametrize("kv,hbm_cap,hbm_bw,host_bw", [
    (100.0, 1e9, 3.0, 1.0), (100.0, 40.0, 3.0, 1.0), (100.0, 0.0, 3.0, 1.0), (64.0, 1e9, 1.0, 1.0),
    (1e9, 3e8, 3.35e12, 5.5e10)])
def test_placement_bound_is_the_minimum(kv, hbm_cap, hbm_bw, host_bw):
  """x* minimizes max(x / hbm_bw, (kv - x) / host_bw) over 0 <= x <= min(cap, kv): the
  bandwidth-proportional split when it fits, the capacity otherwise."""
  b = tier.placement_bound(kv, hbm_cap, hbm_bw, host_bw)
  xs = np.linspace(0.0, min(hbm_cap, kv), 20001)
  brute = np.maximum(xs / hbm_bw, (kv - xs) / host_bw).min()
  assert b["time_s"] == pytest.approx(brute, rel=1e-3)
  assert b["time_s"] <= brute * (1 + 1e-12)
  assert b["hbm_bytes"] + b["host_bytes"] == pytest.approx(kv)
  assert b["bandwidth"] == pytest.approx(kv / b["time_s"])
  split = kv * hbm_bw / (hbm_bw + host_bw)
  assert b["hbm_bytes"] == pytest.approx(min(split, hbm_cap))
  if split <= hbm_cap:
    assert b["bandwidth"] == pytest.approx(hbm_bw + host_bw)  # both tiers stream at full speed
  else:
    assert b["bandwidth"] < hbm_bw + host_bw


def test_placement_bound_empty():
  assert tier.placement_bound(0.0, 10.0, 1.0, 1.0)["bandwidth"] == math.inf


def combine(o_a, lse_a, o_b, lse_b):
  """The decode step's merge of the device part with the host tier's part."""
  return merge_lse([o_a, o_b], [lse_a, lse_b], base2=False)


def test_combine_equals_attention_over_all_keys():
  """Two partial attentions over a split key set merge to attention over all keys."""
  rng = np.random.default_rng(0)
  s, h, kh, e, t, cut = 3, 4, 2, 16, 24, 10
  q = jnp.asarray(rng.normal(size=(s, 1, h, e)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(s, kh, t, e)) * 2, jnp.float32)
  v = jnp.asarray(rng.normal(size=(s, kh, t, e)), jnp.float32)
  lengths = np.array([24, 17, 11])  # slot 2 has one key on the second side
  full = np.arange(t)[None, :] < lengths[:, None]
  with model_lib.matmul_precision(jnp.float32):  # as inside a float32 step: no TF32 on GPUs
    o, lse = model_lib.attention(q, k, v, jnp.asarray(full)[:, None], return_lse=True)
    oa, la = model_lib.attention(q, k[:, :, :cut], v[:, :, :cut], jnp.asarray(full[:, :cut])[:, None],
                                 return_lse=True)
    ob, lb = model_lib.attention(q, k[:, :, cut:], v[:, :, cut:], jnp.asarray(full[:, cut:])[:, None],
                                 return_lse=True)
  om, lm = combine(oa[:, 0], la[:, 0], ob[:, 0], lb[:, 0])
  np.testing.assert_allclose(om, o[:, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lm, lse[:, 0], rtol=1e-5, atol=1e-6)
  om2, _ = combine(ob[:, 0], lb[:, 0], oa[:, 0], la[:, 0])  # symmetric
  np.testing.assert_allclose(om2, o[:, 0], rtol=1e-5, atol=1e-6)


def test_combine_with_an_empty_side_is_exact():
  """A side without keys (lse -inf) returns the other side's o bit for bit (either order)."""
  rng = np.random.default_rng(1)
  s, h, kh, e, t = 2, 4, 2, 16, 12
  q = jnp.asarray(rng.normal(size=(s, 1, h, e)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(s, kh, t, e)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(s, kh, t, e)), jnp.float32)
  oa, la = model_lib.attention(q, k, v, jnp.ones((s, 1, t), bool), return_lse=True)
  ob, lb = model_lib.attention(q, k, v, jnp.zeros((s, 1, t), bool), return_lse=True)
  assert bool(jnp.all(jnp.isneginf(lb))) and not bool(jnp.any(ob))
  oa, la, ob, lb = oa[:, 0], la[:, 0], ob[:, 0], lb[:, 0]
  for args in ((oa, la, ob, lb), (ob, lb, oa, la)):
    o, lse = combine(*args)
    np.testing.assert_array_equal(np.asarray(o), np.asarray(oa))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(la))
  o, lse = combine(ob, lb, ob, lb)  # no keys at all: zeros, lse -inf
  assert not bool(jnp.any(o)) and bool(jnp.all(jnp.isneginf(lse)))


# ----------------------------------------------------------------------------- known bugs


def test_victim_swapped_in_the_same_round_keeps_its_kv(engine, model):
  """A swapped-out request that resumes when the pool is nearly dry is preempted again at once;
  with freed blocks NaN-poisoned its tokens must still be exact."""
  rng = np.random.default_rng(1)
  ps = [[int(t) for t in rng.integers(3, CFG.vocab_size, rng.integers(1, 40))] for _ in range(12)]
  news = [int(x) for x in rng.integers(5, 40, 12)]
  eng = engine(RT_SWAP)
  outs, st = run(eng, ps, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in news])
  assert st.swap_preemptions > 0
  assert_whole(eng)
  assert outs == dense_greedy(model, ps, news)


def test_request_longer_than_device_pool_resumes(engine):
  """Two long requests that only fit with placement; the newer one is swapped out near the end."""
  eng = engine(RT_PLACE)
  eng.stats = EngineStats()
  ps = prompts(30, (8, 8))
  sp = SamplingParams(max_new_tokens=120, ignore_eos=True)
  a = eng.add_request(ps[0], sp)
  eng.step()
  b = eng.add_request(ps[1], sp)
  for _ in range(400):
    if not eng.has_work():
      break
    eng.step()
    check(eng)
  try:
    if eng.requests[b].swapped:  # stuck: its whole KV must come back to a pool too small for it
      assert eng.sched.allocator.blocks_needed(eng.requests[b].num_computed) > eng.sched.allocator.num_total_blocks
    assert eng.requests[a].done and eng.requests[b].done, "a swapped-out request never resumed"
  finally:
    for r in (a, b):
      eng.abort(r)
    assert_whole(eng)


def test_swapped_request_with_placed_extents_resumes(engine):
  """A request with a placed extent is swapped out with 3 more; 4 > max_swap_extents=3."""
  eng = engine(RT_TIGHT)
  eng.stats = EngineStats()
  ps = prompts(31, (8, 24))
  a = eng.add_request(ps[0], SamplingParams(max_new_tokens=60, ignore_eos=True))
  eng.step()
  b = eng.add_request(ps[1], SamplingParams(max_new_tokens=40, ignore_eos=True))
  for _ in range(300):
    if not eng.has_work():
      break
    eng.step()
    check(eng)
  try:
    assert eng.stats.swap_preemptions > 0
    rec = eng.sched.tier.records.get(b)
    if rec is not None:  # stuck: more extents than one step swaps in, though its blocks fit the pool
      assert len(rec.extents) > RT_TIGHT.max_swap_extents
      assert eng.sched.allocator.blocks_needed(eng.requests[b].num_computed) <= eng.sched.allocator.num_total_blocks
    assert eng.requests[a].done and eng.requests[b].done, "a swapped-out request never resumed"
  finally:
    for r in (a, b):
      eng.abort(r)
    assert_whole(eng)


def test_placement_without_swap_extents_is_refused():
  """Placement without a swap budget would be silently off: RuntimeConfig should refuse it."""
  with pytest.raises(ValueError):
    RuntimeConfig(host_blocks=64, host_extent=2, max_host_reads=8, max_host_blocks_per_seq=8)
