"""kvrm_jax.sched.slots (the one owner of per-slot state) and the allocator interface the
scheduler relies on, which the static baseline's reservation provides as the pager does."""

import inspect
import re

import numpy as np

from kvrm_jax.config import RuntimeConfig
from kvrm_jax.sched import scheduler, summaries, tier
from kvrm_jax.sched.pager import BlockPager
from kvrm_jax.sched.request import Request, SamplingParams, Status
from kvrm_jax.sched.slots import ROW_ARRAYS, Slots
from kvrm_jax.sched.static import StaticReservation, static_runtime

RT = RuntimeConfig(block_size=4, num_blocks=32, max_slots=3, max_blocks_per_seq=8, max_groups=2, max_summaries=2)


def test_bind_release_and_the_owner_of_num_computed():
  sl = Slots(RT)
  a, b = (Request(i, [5] * 6, SamplingParams(temperature=0.5, seed=i + 1)) for i in range(2))
  a.num_computed = 3  # out of a slot: the request holds it
  assert sl.bind(a, a.num_computed, Status.PREFILL) == 0 and sl.bind(b, 0, Status.PREFILL) == 1
  assert sl.pos[0] == 3 and a.num_computed == 3 and sl.prefilling == [a, b]
  a.num_computed = 5  # in a slot: the slot array holds it
  assert sl.pos[0] == 5
  assert (sl.temp[:2] == 0.5).all() and list(sl.seed[:2]) == [1, 2]
  a.output_ids.append(9)
  sl.mark_running(a)
  assert a.status is Status.RUNNING and sl.running[0] and sl.tok[0] == 9 and sl.prefilling == [b]
  assert sl.release(a) == 5 and a.slot is None and a.num_computed == 5 and not sl.running[0]
  assert sl.next_free() == 0 and sl.order == [b]


def test_tables_groups_and_derived_views():
  sl = Slots(RT)
  r = Request(0, [5] * 9, SamplingParams())
  sl.bind(r, 9, Status.PREFILL)
  sl.refresh(r, [(7, 0, 2), (3, 2, 1)])
  assert list(sl.bt[0, :4]) == [7, 8, 3, 0] and sl.cap[0] == 12 and sl.ngroups[0] == 2 and sl.nruns[0] == 2
  sl.refresh(r, [(7, 0, 2), (3, 2, 2)], grew=True)  # one more block at the end
  assert list(sl.bt[0, :4]) == [7, 8, 3, 4] and sl.cap[0] == 16
  sl.refresh(r, [(7, 0, 1), (3, 1, 1), (9, 2, 1)])  # more runs than groups: the step reads the table
  assert sl.ngroups[0] == 0 and sl.nruns[0] == 3 and not sl.groups[0].any()
  assert not sl.summary_slots().any()
  sl.sum_base[0], sl.sum_counts[0, 0] = 40, 4.0
  assert list(sl.summary_slots()[0]) == [40, 0]
  sl.folded[0], sl.host[0] = 4, 8
  assert sl.table_start(0) == 12
  r.output_ids.append(1)
  sl.mark_running(r)
  sl.pos[0] = 24  # 24 - 12 = 12 tokens in a table of capacity 12: at a block boundary
  sl.cap[0] = 12
  assert sl.growth_need() == 1


def test_compact_moves_every_row_of_a_request_to_the_lowest_free_slot():
  sl = Slots(RT)
  assert {k for k, v in vars(sl).items() if isinstance(v, np.ndarray)} == set(ROW_ARRAYS)
  a, b, c = (Request(i, [5] * 9, SamplingParams(temperature=0.1 * (i + 1), seed=i + 1)) for i in range(3))
  for r in (a, b, c):
    sl.bind(r, 9, Status.PREFILL)
  sl.refresh(c, [(7, 0, 2), (3, 2, 1)])
  sl.sum_base[2], sl.sum_counts[2, 0], sl.folded[2] = 40, 4.0, 8
  c.output_ids.append(11)
  sl.mark_running(c)
  before = {name: getattr(sl, name)[2].copy() for name in ROW_ARRAYS}
  sl.release(a)
  assert sl.compact(3) == 0  # slots 1 and 2 are below 3: nothing to move
  assert sl.compact(2) == 1 and c.slot == 0 and sl.reqs[0] is c and sl.reqs[2] is None and b.slot == 1
  for name in ROW_ARRAYS:
    assert np.array_equal(getattr(sl, name)[0], before[name]), name
  assert c.num_computed == 9 and not sl.running[2] and not sl.bt[2].any() and sl.sum_base[2] == -1
  assert sl.next_free() == 2 and sl.order == [b, c]
  assert static_runtime(RuntimeConfig(max_slots=4, decode_buckets=(2,))).decode_buckets == ()  # slots own blocks


def allocator_calls() -> set[str]:
  """Allocator methods and properties the scheduler (with its tier and summary planning) uses."""
  src = "".join(inspect.getsource(m) for m in (scheduler, tier, summaries))
  return set(re.findall(r"allocator\.(\w+)", src))


def test_static_reservation_answers_the_pager_interface():
  calls = allocator_calls()
  assert {"allocate", "append", "free", "runs", "plan_compaction", "blocks_needed"} <= calls
  for cls in (BlockPager, StaticReservation):
    missing = [c for c in calls if not hasattr(cls, c)]
    assert not missing, f"{cls.__name__} lacks {missing}"
  a = StaticReservation(2, 4, 4)
  assert a.allocate("x", [1, 2, 3]) == 0 and a.allocate("y", [1]) == 0
  assert a.block_table("x") == [1, 2, 3, 4] and a.runs("y") == [(5, 0, 4)]
  a.free("x")
  assert a.allocate("z", [1]) == 0 and a.runs("z") == [(1, 0, 4)]  # the lowest free reservation again
  assert np.array_equal(a.block_table("z"), [1, 2, 3, 4])
