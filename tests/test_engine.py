"""The KV-RM engine and the static baseline on a tiny random model, against the dense reference."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY, needs_devices, random_prompts

from kvrm_jax.config import RuntimeConfig
from kvrm_jax.engine import Engine
from kvrm_jax.model import reference
from kvrm_jax.model.llama import Llama
from kvrm_jax.sched.request import RequestError
from kvrm_jax.sched.request import SamplingParams
from kvrm_jax.step.sampling import resolve_branch_free

CFG = TINY
RT = RuntimeConfig(block_size=8, num_blocks=96, max_slots=4, max_blocks_per_seq=16, max_groups=2, max_moves=4,
                   prefill_buckets=(8, 32))


prompts = random_prompts


@pytest.fixture(scope="module")
def mixed(model):
  """Mixed lengths (one mid-block, one exactly a block, one longer than the biggest bucket) and the
  reference continuations; 7 prompts on 4 slots so requests are admitted mid-flight."""
  ps = prompts(0, (5, 17, 40, 3, 70, 16, 9))
  news = [20, 7, 13, 20, 5, 11, 16]
  ref = [reference.greedy_generate(model, p, n, CFG.eos_ids) for p, n in zip(ps, news)]
  return ps, [SamplingParams(max_new_tokens=n) for n in news], ref


@pytest.mark.parametrize("kind", ["kvrm", "static"])
def test_greedy_matches_dense_reference(model, mixed, kind):
  ps, sps, ref = mixed
  eng = Engine(CFG, model, RT, kind=kind)
  outs = eng.generate(ps, sps)
  assert [o.output_ids for o in outs] == ref
  assert all(o.finished for o in outs)
  s = eng.summary()
  assert s["decode_compiles"] == 1
  assert s["prefill_compiles"] == 2  # both buckets were needed (the 70-token prompt takes 32-chunks)
  assert eng.sched.allocator.num_free_blocks == eng.sched.allocator.num_total_blocks


def test_pool_too_small_forces_preemption_same_output(model, mixed):
  ps, sps, ref = mixed
  rt = RuntimeConfig(block_size=8, num_blocks=15, max_slots=4, max_blocks_per_seq=16, max_groups=2, max_moves=4,
                     prefill_buckets=(8, 32))
  eng = Engine(CFG, model, rt)
  outs = eng.generate(ps, sps)
  assert eng.stats.preemptions > 0
  assert [o.output_ids for o in outs] == ref
  assert eng.summary()["decode_compiles"] == 1
  assert eng.sched.allocator.num_free_blocks == eng.sched.allocator.num_total_blocks


def test_poisoned_freed_blocks_do_not_change_outputs(model, mixed):
  ps, sps, ref = mixed
  rt = RuntimeConfig(block_size=8, num_blocks=15, max_slots=4, max_blocks_per_seq=16, max_groups=2, max_moves=4,
                     prefill_buckets=(8, 32), debug_poison_freed=True)
  eng = Engine(CFG, model, rt)
  outs = eng.generate(ps, sps)
  assert [o.output_ids for o in outs] == ref
  import jax.numpy as jnp
  assert bool(jnp.isnan(eng.k_pool).any())  # the poison really went in


def test_sampling_is_batch_and_slot_independent(model):
  ps = prompts(1, (6, 11, 25))
  sp = [SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=s) for s in (1, 2, 3)]
  together = Engine(CFG, model, RT).generate(ps, sp)
  alone = [Engine(CFG, model, RT).generate([p], [s])[0] for p, s in zip(ps, sp)]
  assert [o.output_ids for o in together] == [o.output_ids for o in alone]
  greedy = Engine(CFG, model, RT).generate(ps, SamplingParams(max_new_tokens=12))
  assert [o.output_ids for o in together] != [o.output_ids for o in greedy]


def test_shared_prefix_hits_and_same_output(model):
  base = prompts(2, (40,))[0]
  ps = [base + t for t in prompts(3, (3, 9, 5))]
  ref = [reference.greedy_generate(model, p, 8, CFG.eos_ids) for p in ps]
  rt = RuntimeConfig(block_size=8, num_blocks=96, max_slots=1, max_blocks_per_seq=16, prefill_buckets=(8, 32))
  eng = Engine(CFG, model, rt)
  outs = eng.generate(ps, SamplingParams(max_new_tokens=8))
  assert [o.output_ids for o in outs] == ref
  assert eng.stats.prefix_hit_blocks >= 2 * (40 // 8)


def test_streaming_api_and_mid_flight_admission(model):
  eng = Engine(CFG, model, RT)
  ps = prompts(4, (4, 30, 12, 8, 19, 6))
  ids = [eng.add_request(p, SamplingParams(max_new_tokens=6)) for p in ps[:3]]
  got = {i: [] for i in range(len(ps))}
  steps = 0
  while eng.has_work():
    for rid, toks in eng.step().items():
      got[rid].extend(toks)
    steps += 1
    if steps == 3:
      ids += [eng.add_request(p, SamplingParams(max_new_tokens=6)) for p in ps[3:]]
  for rid, p in zip(ids, ps):
    assert got[rid] == reference.greedy_generate(eng_model(eng), p, 6, CFG.eos_ids)
  assert eng.compiles.decode == 1


def eng_model(eng):
  from kvrm_jax.model.llama import merge
  return merge(eng.graphdef, eng.state)


def test_fragmentation_triggers_compaction(model):
  """Tiny blocks and many interleaved growing sequences fragment the pool; compaction moves
  blocks (inside the same compiled step) and outputs stay exact."""
  ps = prompts(5, (3, 5, 2, 7, 4, 6, 3, 5))
  rt = RuntimeConfig(block_size=8, num_blocks=48, max_slots=8, max_blocks_per_seq=8, max_groups=1, max_moves=4,
                     prefill_buckets=(8,))
  eng = Engine(CFG, model, rt)
  sps = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (40, 30, 45, 20, 35, 41, 25, 33)]
  outs = eng.generate(ps, sps)
  ref = [reference.greedy_generate(model, p, s.max_new_tokens) for p, s in zip(ps, sps)]
  assert [o.output_ids for o in outs] == ref
  assert eng.stats.moves > 0
  assert eng.compiles.decode == 1


def test_rejects_impossible_requests(model):
  eng = Engine(CFG, model, RT)
  with pytest.raises(RequestError, match="empty"):
    eng.add_request([], SamplingParams())
  with pytest.raises(RequestError, match="context"):
    eng.add_request([5] * 120, SamplingParams(max_new_tokens=20))
  with pytest.raises(RequestError, match="token ids"):
    eng.add_request([CFG.vocab_size + 1], SamplingParams())
  with pytest.raises(ValueError):
    SamplingParams(top_p=0.0)


def test_soak_random_eos_everything_accounted(model):
  """Thousands of short requests with random lengths: every one completes, and the pool is
  whole again at the end."""
  rng = np.random.default_rng(7)
  rt = RuntimeConfig(block_size=8, num_blocks=40, max_slots=16, max_blocks_per_seq=4, max_groups=2, max_moves=4,
                     prefill_buckets=(8,), max_prefill_seqs=8)
  eng = Engine(CFG, model, rt)
  n = 2000
  for _ in range(n):
    p = [int(t) for t in rng.integers(3, CFG.vocab_size, rng.integers(1, 9))]
    eng.add_request(p, SamplingParams(max_new_tokens=int(rng.integers(1, 6)), temperature=1.0,
                                      seed=int(rng.integers(0, 1000))))
  while eng.has_work():
    eng.step()
  reqs = list(eng.requests.values())
  assert len(reqs) == n and all(r.done and r.finish_reason in ("eos", "length") for r in reqs)
  assert all(1 <= len(r.output_ids) <= r.sampling.max_new_tokens for r in reqs)
  assert eng.sched.allocator.num_free_blocks == eng.sched.allocator.num_total_blocks
  eng.sched.allocator.check_invariants()
  assert eng.compiles.decode == 1 and eng.compiles.prefill == 1


def test_mixed_length_reserved_kv_close_to_live(model):
  """Paged reservation tracks live KV (<= 1.15x at peak); the static baseline reserves max_len per slot."""
  rng = np.random.default_rng(11)
  n = 24
  plens = np.clip(rng.lognormal(3.5, 0.6, n).astype(int), 4, 120)
  olens = np.clip(rng.lognormal(3.0, 0.6, n).astype(int), 4, 60)
  ps = [[int(t) for t in rng.integers(3, CFG.vocab_size, p)] for p in plens]
  sps = [SamplingParams(max_new_tokens=int(o), ignore_eos=True) for o in olens]
  rt = RuntimeConfig(block_size=8, num_blocks=400, max_slots=8, max_blocks_per_seq=23, prefill_buckets=(32,),
                     max_prefill_seqs=8)
  ratios = {}
  for kind in ("kvrm", "static"):
    eng = Engine(CFG, model, rt, kind=kind)
    eng.generate(ps, sps)
    s = eng.summary()
    ratios[kind] = s["reserved_kv_bytes"] / s["live_kv_bytes"]
  print("peak reserved / peak live:", ratios)
  assert ratios["kvrm"] <= 1.15
  assert ratios["static"] > 1.5 * ratios["kvrm"]


@pytest.mark.parametrize("step_tokens,prompt_attention", [(0, "gather"), (0, "kernel"), (2 + 2 * 8, "kernel")])
def test_pallas_kernel_path_in_interpret_mode_matches(model, step_tokens, prompt_attention):
  """The engine's kernel path (layer-offset block ids into the [K, L*N] pool view, lse merge,
  block-copy kernel; prompt chunks through the paged tile kernel, in prefill calls or mixed-step
  tiles) in Pallas interpret mode decodes what the reference path decodes."""
  ps = prompts(8, (5, 19))
  sp = SamplingParams(max_new_tokens=6)
  rt = RuntimeConfig(block_size=8, num_blocks=24, max_slots=2, max_blocks_per_seq=4, max_groups=2, max_moves=2,
                     prefill_buckets=(32,), attention="interpret", step_tokens=step_tokens, tile=8,
                     prompt_attention=prompt_attention)
  ref = [reference.greedy_generate(model, p, 6, CFG.eos_ids) for p in ps]
  eng = Engine(CFG, model, rt)
  assert [o.output_ids for o in eng.generate(ps, sp)] == ref
  assert (eng.stats.mixed_steps > 0) == bool(step_tokens)


@pytest.mark.parametrize("step_tokens", [0, 2 + 2 * 8])
def test_block_tables_are_padded_to_whole_16_byte_rows(model, step_tokens):
  """A table row of 5 blocks travels as 8 columns (what the Mosaic kernels read by TMA); sequences
  that fill all 5 blocks decode as the reference does, in prefill calls and in mixed steps."""
  from kvrm_jax import descriptor
  from pallas_kernels import paged_attention_mgpu
  rt = RuntimeConfig(block_size=8, num_blocks=24, max_slots=2, max_blocks_per_seq=5, max_groups=2,
                     prefill_buckets=(8, 32), step_tokens=step_tokens, tile=8)
  assert rt.table_width == 8 and rt.max_seq_len == 40 and paged_attention_mgpu.table_plan_ok(rt.table_width)
  layout = dict(descriptor.decode_layout(rt).ints)
  assert layout["block_tables"] == (2, 8)
  ps = prompts(9, (21, 33))
  news = [40 - len(p) for p in ps]  # to the last token the 5 blocks hold
  ref = [reference.greedy_generate(model, p, n, CFG.eos_ids) for p, n in zip(ps, news)]
  eng = Engine(CFG, model, rt)
  assert [o.output_ids for o in eng.generate(ps, [SamplingParams(max_new_tokens=n) for n in news])] == ref
  assert eng.sched.slots.bt.shape == (2, 8)
  assert eng.sched.allocator.num_free_blocks == eng.sched.allocator.num_total_blocks


def test_descriptor_fields_are_views_of_the_packed_buffers():
  """Layout.new()'s fields are written in place into the two buffers `pack` hands over (no copy);
  the same values as separate arrays pack to the same buffers; on the device `unpack` reads each
  field back."""
  from kvrm_jax import descriptor
  rt = RuntimeConfig(block_size=8, num_blocks=24, max_slots=3, max_blocks_per_seq=5, max_groups=2, step_tokens=3 + 16,
                     tile=8)
  for layout in (descriptor.decode_layout(rt), descriptor.mixed_layout(rt, 2)):
    rng = np.random.default_rng(0)
    d = layout.new()
    for name, arr in d.items():
      arr[...] = rng.integers(1, 100, arr.shape)
    ints, floats = layout.pack(d)
    assert ints.size == layout.int_size and floats.size == layout.float_size
    assert all(np.shares_memory(a, ints) or np.shares_memory(a, floats) for a in d.values())  # no copy made
    again = layout.pack({n: np.array(a) for n, a in d.items()})  # plain arrays: concatenated
    np.testing.assert_array_equal(again[0], ints)
    np.testing.assert_array_equal(again[1], floats)
    back = layout.unpack(jnp.asarray(ints), jnp.asarray(floats))
    assert set(back) == set(d)
    for name, arr in d.items():
      np.testing.assert_array_equal(np.asarray(back[name]), arr)
    assert not layout.new()["block_tables"].any()  # each new() is a fresh zero descriptor


def test_abort_frees_everything(model):
  eng = Engine(CFG, model, RT)
  rids = [eng.add_request(p, SamplingParams(max_new_tokens=50, ignore_eos=True)) for p in prompts(9, (30, 5, 12, 7, 9, 40))]
  for _ in range(3):
    eng.step()
  assert any(eng.requests[r].slot is not None for r in rids) and eng.sched.waiting
  assert all(eng.abort(r) for r in rids)
  assert not eng.has_work() and not eng.abort(rids[0])
  assert all(eng.requests[r].finish_reason == "aborted" for r in rids)
  assert eng.sched.allocator.num_free_blocks == eng.sched.allocator.num_total_blocks
  eng.sched.allocator.check_invariants()


def test_xla_options_reach_the_compiled_steps():
  """RuntimeConfig.xla_options: parsed from a command line, validated, and passed to XLA (a misspelt
  option fails at the first step's compile, so it cannot be silently ignored)."""
  import dataclasses

  from kvrm_jax.step import steps as step_lib
  from kvrm_jax.config import parse_xla_options
  assert parse_xla_options("xla_gpu_enable_triton_gemm=false, xla_foo=3,xla_bar=x") == (
      ("xla_gpu_enable_triton_gemm", False), ("xla_foo", 3), ("xla_bar", "x"))
  assert parse_xla_options("") == ()
  # XLA's list-valued options keep their commas
  assert parse_xla_options("xla_gpu_enable_command_buffer=FUSION,CUBLAS, CONDITIONAL,xla_foo=true") == (
      ("xla_gpu_enable_command_buffer", "FUSION,CUBLAS,CONDITIONAL"), ("xla_foo", True))
  with pytest.raises(ValueError, match="name=value"):
    parse_xla_options("xla_gpu_enable_triton_gemm")
  with pytest.raises(ValueError, match="name=value"):
    parse_xla_options("=3,xla_foo=1")
  with pytest.raises(ValueError, match="pairs"):
    RuntimeConfig(xla_options=("xla_gpu_enable_triton_gemm",))
  rt = dataclasses.replace(RT, xla_options=(("xla_gpu_enable_triton_gemm", False),))
  assert step_lib.compiler_options(rt)["xla_gpu_enable_triton_gemm"] is False
  assert step_lib.compiler_options(RT, 4096) is None  # float32: XLA's defaults whatever the rows and backend
  bad = dataclasses.replace(RT, xla_options=(("xla_no_such_option", True),), prefill_buckets=(8,))
  eng = Engine(CFG, Llama(CFG, rngs=nnx.Rngs(0)), bad)
  eng.add_request([5, 6, 7], SamplingParams(max_new_tokens=2))
  with pytest.raises(Exception, match="xla_no_such_option"):
    eng.step()


def _dot_precisions(jaxpr) -> list:
  """The precision of every dot_general in a jaxpr, nested ones (scan, shard_map, pjit) included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(eqn.params["precision"])
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else (v,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out += _dot_precisions(inner)
  return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float32_steps_use_exact_float32_matmuls(dtype):
  """A float32 engine traces its steps under "highest" precision, so on GPUs XLA and Pallas Triton
  run IEEE float32 dots rather than their TF32 default (a tp=2 run then decodes what tp=1 does);
  a bf16 engine keeps the backend's default."""
  import dataclasses

  import jax
  eng = Engine(CFG, Llama(CFG, rngs=nnx.Rngs(0)), dataclasses.replace(RT, dtype=dtype, prefill_buckets=(8,)))
  eng.add_request([5, 6, 7], SamplingParams(max_new_tokens=4))
  eng.step()  # prefill: the request now decodes
  ints, floats = eng.build_decode_descriptor(eng.schedule())
  traced = eng.decode_step.trace(eng.state, eng.k_pool, eng.v_pool, ints, floats)
  precisions = _dot_precisions(traced.jaxpr.jaxpr)
  assert len(precisions) >= 4  # qkv, o, gate/up, down, lm head, attention
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  assert all(p == highest for p in precisions) if dtype == "float32" else all(p is None for p in precisions)
  with jax.default_matmul_precision("tensorfloat32"):  # the process's own choice wins
    eng2 = Engine(CFG, Llama(CFG, rngs=nnx.Rngs(0)), dataclasses.replace(RT, dtype=dtype, prefill_buckets=(8,)))
    traced = eng2.decode_step.trace(eng.state, eng.k_pool, eng.v_pool, ints, floats)
  tf32 = (jax.lax.Precision.HIGH, jax.lax.Precision.HIGH)
  assert all(p == tf32 for p in _dot_precisions(traced.jaxpr.jaxpr))


def test_reference_decoder_uses_exact_float32_matmuls(model):
  """The dense reference the engines are tested against is exact float32 too: its forward pass (the
  model called outside any engine step) traces every dot under "highest" precision. A TF32 reference
  on a GPU flips greedy near-ties that the exact engine does not (a compaction run diverged from it
  at its 33rd token while matching the exact reference and the same run without compaction)."""
  import jax
  import jax.numpy as jnp
  graphdef, state = nnx.split(model)
  ids = jnp.arange(5, dtype=jnp.int32)
  jaxpr = jax.make_jaxpr(lambda s: reference._forward.__wrapped__(graphdef, s, ids))(state)
  precisions = _dot_precisions(jaxpr.jaxpr)
  assert precisions and all(p == (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST) for p in precisions)


def test_bfloat16_engine_from_float32_model_computes_in_bfloat16(model):
  """An engine computes in its runtime dtype whatever the model was built in: a bfloat16 engine
  from a float32 model casts the weights, so the Pallas kernels (interpret mode here, Mosaic GPU on
  a GPU) get q, k and v of one dtype instead of float32 queries over a bfloat16 pool."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  rt = dataclasses.replace(RT, dtype="bfloat16", attention="interpret", prefill_buckets=(8,))
  eng = Engine(CFG, model, rt)
  assert {x.dtype for x in jax.tree.leaves(eng.state)} == {jnp.dtype(jnp.bfloat16)}
  assert model.wqkv[...].dtype == jnp.float32  # the caller's model is left as it was
  out = eng.generate([[5, 6, 7], [9, 10]], SamplingParams(max_new_tokens=3))
  assert [len(o.output_ids) for o in out] == [3, 3]


def test_steps_compile_once_whatever_the_tracing_context_later(model):
  """The engine runs each step's ahead-of-time executable: a change of JAX's tracing context after
  the first steps (on a GPU, a JAX module that Pallas interpret mode imported later did this, and
  every engine's steps traced again) neither traces nor compiles a step a second time."""
  import jax
  eng = Engine(CFG, model, RT)
  ps = prompts(3, (5, 7))  # both in the 8-token prefill bucket
  eng.add_request(ps[0], SamplingParams(max_new_tokens=6))
  eng.step()
  eng.step()
  with jax.numpy_rank_promotion("warn"):  # a value of the tracing context (default "allow")
    eng.add_request(ps[1], SamplingParams(max_new_tokens=3))
    while eng.has_work():
      eng.step()
  assert (eng.compiles.decode, eng.compiles.prefill) == (1, 1)
  assert eng.sched.allocator.num_free_blocks == eng.sched.allocator.num_total_blocks


@pytest.mark.parametrize("threads", [1, 3])
def test_compile_all_compiles_every_step_once_before_any_request(model, threads):
  """compile_all builds each executable the engine's steps use (decode rows, prompt buckets) before
  any request, one at a time or in threads; the requests then run on them with nothing compiled
  again, and the tokens equal an engine that compiled each step on first use."""
  rt = dataclasses.replace(RT, decode_buckets=(2,))
  ps = prompts(3, (5, 7, 11))
  lazy = Engine(CFG, model, rt)
  want = [o.output_ids for o in lazy.generate(ps, SamplingParams(max_new_tokens=5))]
  eng = Engine(CFG, model, rt)
  names = []
  eng.on_compile = lambda name, s: names.append(name)
  count, secs = eng.compile_all(threads)
  keys = {("decode",), ("decode", 2)} | {("prefill", c) for c in rt.prefill_buckets}
  assert set(eng._executables) == keys and count == len(keys) == len(names) and secs > 0
  assert (eng.compiles.decode, eng.compiles.prefill) == (2, len(rt.prefill_buckets))
  assert [o.output_ids for o in eng.generate(ps, SamplingParams(max_new_tokens=5))] == want
  assert eng.compile_all()[0] == 0 and len(names) == len(keys)
  assert (eng.compiles.decode, eng.compiles.prefill) == (2, len(rt.prefill_buckets))


def _feature_engine(feature, model, step_tokens=0, decode_buckets=()):
  """(engine, batches of (prompts, sampling)) that exercise one runtime feature on the default
  backend (reference attention on CPU, the Pallas kernels on a GPU); batches run one after another.
  step_tokens > 0: mixed steps of that many tokens, in tiles of 8, through the paged tile kernel.
  decode_buckets: RuntimeConfig.decode_buckets."""
  import jax

  from kvrm_jax.step import sharding
  from kvrm_jax.sched.summaries import SummaryConfig
  base = dict(block_size=8, max_slots=4, max_blocks_per_seq=16, max_groups=2, max_moves=4, prefill_buckets=(8, 32))
  ps = prompts(0, (5, 17, 40, 3, 70, 16, 9))
  sps = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (20, 7, 13, 20, 5, 11, 16)]
  kw = {}
  mixed = lambda rt: dataclasses.replace(  # noqa: E731
      rt, decode_buckets=decode_buckets, **(dict(step_tokens=step_tokens, tile=8, prompt_attention="kernel")
                                            if step_tokens else {}))
  if feature == "tier":  # 14 usable device blocks: cold blocks are placed on the host
    rt = RuntimeConfig(num_blocks=15, host_blocks=64, host_extent=2, max_swap_extents=8, max_host_reads=8,
                       max_host_blocks_per_seq=8, debug_poison_freed=True, **base)
  elif feature == "summaries":
    rt, kw = RuntimeConfig(num_blocks=96, max_summaries=2, **base), dict(summaries=SummaryConfig(1, 16, 2))
  elif feature == "compaction":  # test_fragmentation_triggers_compaction's workload
    rt = RuntimeConfig(block_size=8, num_blocks=48, max_slots=8, max_blocks_per_seq=8, max_groups=1, max_moves=4,
                       prefill_buckets=(8,))
    ps = prompts(5, (3, 5, 2, 7, 4, 6, 3, 5))
    sps = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (40, 30, 45, 20, 35, 41, 25, 33)]
  elif feature == "prefix":  # a system prompt of 3 blocks, computed once, then shared
    rt = RuntimeConfig(num_blocks=96, **base)
    shared = prompts(12, (24,))[0]
    ps = [shared + p for p in prompts(13, (3, 9, 5, 12))]
    sps = sps[:len(ps)]
    return Engine(CFG, model, mixed(rt)), [(ps[:1], sps[:1]), (ps[1:], sps[1:])]
  else:  # sharding: every device of the backend (2 forced host devices on CPU, all GPUs on a GPU machine)
    rt, kw = RuntimeConfig(num_blocks=96, **base), dict(mesh=sharding.make_mesh(len(jax.devices())))
  return Engine(CFG, model, mixed(rt), **kw), [(ps, sps)]


def _exercised(feature, eng) -> bool:
  st = eng.stats
  return {"tier": st.placed_blocks > 0, "summaries": st.folds > 0,  # tier: the step stages host extents
          "compaction": st.moves > 0, "prefix": st.prefix_hit_blocks > 0, "sharding": eng.mesh is not None}[feature]


@pytest.mark.parametrize("feature", ["tier", "summaries", "compaction", "prefix", "sharding"])
def test_one_compile_per_step_and_mixed_steps_under_each_feature(model, feature):
  """The one-compile promise under each feature, on whatever backend runs the suite: one decode
  executable, one prefill executable per bucket used, with the feature really exercised.

  Then mixed steps (one device call per step: decode rows + prompt tiles, RuntimeConfig.step_tokens)
  decode what those separate prefill and decode calls did; their executables are the tile buckets
  used (and the decode step for steps without prompt work), no prefill step."""
  eng, batches = _feature_engine(feature, model)
  used, want = set(), []
  for ps, sps in batches:
    outs = eng.generate(ps, sps)
    assert all(o.finished for o in outs)
    want.append([o.output_ids for o in outs])
    used |= {next((b for b in eng.rt.prefill_buckets if b >= len(p)), max(eng.rt.prefill_buckets)) for p in ps}
  assert _exercised(feature, eng)
  assert eng.compiles.decode == 1
  assert 1 <= eng.compiles.prefill <= len(used)
  assert eng.sched.allocator.num_free_blocks == eng.sched.allocator.num_total_blocks

  mixed, _ = _feature_engine(feature, model, step_tokens=eng.rt.max_slots + 3 * 8)
  assert mixed.rt.tile_buckets == (1, 2, 3)
  for (ps, sps), w in zip(batches, want):
    assert [o.output_ids for o in mixed.generate(ps, sps)] == w
  st = mixed.stats
  assert _exercised(feature, mixed) and st.mixed_steps > 0 and st.mixed_steps == st.prefill_steps
  assert mixed.compiles.prefill == 0 and mixed.compiles.decode <= 1
  assert 1 <= mixed.compiles.mixed == len([k for k in mixed._executables if k[0] == "mixed"]) <= 3
  assert mixed.sched.allocator.num_free_blocks == mixed.sched.allocator.num_total_blocks

  # Decode steps over fewer rows (RuntimeConfig.decode_buckets): requests move to the lowest slots
  # between steps; same tokens, one decode executable per row count used.
  fewer, _ = _feature_engine(feature, model, decode_buckets=(1, 2))
  for (ps, sps), w in zip(batches, want):
    assert [o.output_ids for o in fewer.generate(ps, sps)] == w
  rows = set(fewer.stats.decode_rows)
  assert _exercised(feature, fewer) and min(rows) < fewer.rt.max_slots and fewer.stats.slot_moves > 0
  assert fewer.compiles.decode == len(rows) == len([k for k in fewer._executables if k[0] == "decode"])
  assert fewer.sched.allocator.num_free_blocks == fewer.sched.allocator.num_total_blocks


def test_mixed_step_splits_a_long_prompt_without_stalling_decode(model):
  """Token budget: running sequences decode every step while a 100-token prompt is computed in
  chunks of at most 2 tiles (16 tokens) per step; sampled tokens equal the separate calls' (the key
  is the seed and position, whatever the step)."""
  rt = dataclasses.replace(RT, step_tokens=RT.max_slots + 2 * 8, tile=8)
  assert rt.tile_buckets == (1, 2)
  eng = Engine(CFG, model, rt)
  sp = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, top_k=20, seed=7, ignore_eos=True)
  short = [eng.add_request(p, sp) for p in prompts(20, (3, 6))]
  while any(not eng.requests[r].output_ids for r in short):
    eng.step()
  long_prompt = prompts(21, (100,))[0]
  rid = eng.add_request(long_prompt, sp)
  prompt_steps = 0
  while not eng.requests[rid].output_ids:
    prompt_steps += 1
    events = eng.step()
    assert all(r in events for r in short)  # every running sequence got its token this step
  assert prompt_steps == 7  # ceil(100 / 16)
  while eng.has_work():
    eng.step()
  assert eng.compiles.prefill == 0 and eng.compiles.mixed <= 2 and eng.compiles.decode == 1
  # Prompt positions computed: the two short prompts in one step of 2 tiles, the long one in 6 steps
  # of 2 tiles and a last of 4 tokens in 1 tile (bucket 1): 109 tokens in 16 + 6 * 16 + 8 positions.
  assert (eng.stats.prompt_tokens, eng.stats.prompt_positions) == (3 + 6 + 100, 16 + 6 * 16 + 8)
  split_eng = Engine(CFG, model, RT)
  split = split_eng.generate(prompts(20, (3, 6)) + [long_prompt], sp)
  assert [eng.requests[r].output_ids for r in short + [rid]] == [o.output_ids for o in split]
  st = split_eng.stats  # separate prefill calls: rows x chunk of a bucket per call
  assert st.prompt_tokens == 109 and st.prompt_positions >= 109
  assert st.prompt_positions % (RT.max_prefill_seqs * min(RT.prefill_buckets)) == 0


def test_mixed_step_sizes_are_checked():
  with pytest.raises(ValueError, match="step_tokens must be 0 .* or >= max_slots \\+ tile = 12"):
    RuntimeConfig(max_slots=4, tile=8, step_tokens=11)
  with pytest.raises(ValueError, match="tile must be positive"):
    RuntimeConfig(tile=0, step_tokens=64)
  assert RuntimeConfig(max_slots=4, tile=8, step_tokens=4 + 8 * 20).tile_buckets == (1, 2, 4, 8, 16, 20)
  assert RuntimeConfig(max_slots=4, tile=8).tile_buckets == ()
  with pytest.raises(ValueError, match="unknown prompt_attention 'flash' \\(auto \\| gather \\| kernel\\)"):
    RuntimeConfig(prompt_attention="flash")
  for bad in ((4,), (2, 2), (3, 1), (0,)):
    with pytest.raises(ValueError, match="decode_buckets must be strictly ascending row counts in \\[1, max_slots=4\\)"):
      RuntimeConfig(max_slots=4, decode_buckets=bad)
  rt = RuntimeConfig(max_slots=8, decode_buckets=(2, 4))
  assert rt.decode_rows == (2, 4, 8) and [rt.rows_for(n) for n in (1, 2, 3, 5, 8)] == [2, 2, 4, 8, 8]
  mixed = dict(max_slots=4, tile=8, step_tokens=4 + 8 * 20)  # max_tiles 20
  assert RuntimeConfig(**mixed, tile_counts=(1, 3, 6, 12)).tile_buckets == (1, 3, 6, 12, 20)
  for bad in ((20,), (3, 3), (6, 3), (0, 4)):
    with pytest.raises(ValueError, match="tile_counts must be strictly ascending tile counts in \\[1, max_tiles=20\\)"):
      RuntimeConfig(**mixed, tile_counts=bad)
  with pytest.raises(ValueError, match="tile_counts need mixed steps"):
    RuntimeConfig(max_slots=4, tile_counts=(2,))


def test_tile_counts_pick_the_mixed_step_that_holds_a_step(model):
  """RuntimeConfig.tile_counts: a 17-token prompt (3 tiles of 8) runs in the 3-tile step, not the
  4-tile one of the powers of two (24 prompt positions, not 32), with the same tokens."""
  rt = dataclasses.replace(RT, step_tokens=RT.max_slots + 4 * 8, tile=8, tile_counts=(3,))
  assert rt.tile_buckets == (3, 4)
  eng, sp, p = Engine(CFG, model, rt), SamplingParams(max_new_tokens=6, ignore_eos=True), prompts(40, (17,))
  out = eng.generate(p, sp)
  assert (eng.stats.prompt_tokens, eng.stats.prompt_positions, eng.compiles.mixed) == (17, 24, 1)
  pow2 = Engine(CFG, model, dataclasses.replace(rt, tile_counts=()))
  assert [o.output_ids for o in pow2.generate(p, sp)] == [o.output_ids for o in out]
  assert pow2.stats.prompt_positions == 32


def test_summary_reports_startup_split(model):
  eng = Engine(CFG, model, RT)
  fresh = eng.summary()["startup_s"]
  assert fresh["engine_build"] > 0 and fresh["compile"] == 0 and fresh["first_token"] is None
  eng.generate(prompts(4, (5, 9)), SamplingParams(max_new_tokens=3))
  first = eng.summary()["startup_s"]
  assert first["compile"] > 0 and first["first_token"] > 0
  eng.generate(prompts(5, (5, 9)), SamplingParams(max_new_tokens=3))  # same shapes: nothing new to compile
  assert eng.summary()["startup_s"] == first


# ----------------------------------------------------------------------------- the pipelined loop


def _pipeline_case():
  """More requests than slots, greedy and sampled, a shared prefix, EOS mid-stream (a token the
  synchronous run emits early), freed blocks poisoned with NaN."""
  shared = prompts(30, (16,))[0]
  ps = prompts(31, (5, 17, 3, 9)) + [shared + p for p in prompts(32, (4, 7, 2))]
  sps = [SamplingParams(max_new_tokens=n, temperature=t, top_k=k, seed=i)
         for i, (n, t, k) in enumerate([(20, 0, 0), (12, 1.0, 0), (25, 0.8, 20), (18, 0, 0), (9, 1.0, 0),
                                        (22, 0, 0), (14, 0.7, 5)])]
  rt = dataclasses.replace(RT, max_slots=3, debug_poison_freed=True)
  return ps, sps, rt


@pytest.mark.parametrize("tp", [None, 2])
def test_pipelined_loop_equals_the_synchronous_one(model, tp):
  """Same tokens and finish reasons, one decode executable (one per row count with decode buckets,
  whose slot moves wait for a step with nothing in flight); with tp=2 the fed descriptor keeps the
  replicated placement the sharded step takes."""
  from kvrm_jax.step import sharding
  if tp and needs_devices(tp):
    pytest.skip(needs_devices(tp))
  mesh = sharding.make_mesh(tp) if tp else None
  ps, sps, rt = _pipeline_case()
  first = Engine(CFG, model, rt).generate(ps, sps)
  eos = first[0].output_ids[4]  # request 0 ends at its 5th token (and others where they sample it)
  cfg = dataclasses.replace(CFG, eos_ids=(eos,))
  runs = {}
  for pipeline, buckets in ((False, ()), (True, ()), (True, (1, 2))):
    eng = Engine(cfg, model, dataclasses.replace(rt, pipeline=pipeline, decode_buckets=buckets), mesh=mesh)
    outs = eng.generate(ps, sps)
    assert eng.compiles.decode == len(set(eng.stats.decode_rows)) == (3 if buckets else 1)
    runs[pipeline, buckets] = [(o.output_ids, o.finish_reason) for o in outs]
    assert not eng.has_work()
    assert eng.sched.allocator.num_free_blocks == eng.sched.allocator.num_total_blocks
    eng.sched.allocator.check_invariants()
    if pipeline:
      st = eng.stats
      assert st.pipelined_steps > 10 and st.prefix_hit_blocks > 0
      assert (st.slot_moves > 0) == bool(buckets)
  assert runs[True, ()] == runs[False, ()] == runs[True, (1, 2)]
  assert runs[True, ()][0] == (first[0].output_ids[:5], "eos")


def test_pipelined_loop_abort_in_flight(model):
  """An abort while a step holding the request is in flight: the request ends at once, its blocks
  are free; the in-flight token is dropped; the others decode what they decode without the abort."""
  ps, sps, rt = _pipeline_case()
  ps, sps = ps[:3], sps[:3]
  want = [o.output_ids for o in Engine(CFG, model, rt).generate(ps, sps)]
  eng = Engine(CFG, model, dataclasses.replace(rt, pipeline=True))
  rids = [eng.add_request(p, sp) for p, sp in zip(ps, sps)]
  while eng._inflight is None or len(eng.requests[rids[1]].output_ids) < 3:
    eng.step()
  assert any(r.id == rids[1] for r in eng._inflight[0].decode)
  assert eng.abort(rids[1])
  while eng.has_work():
    eng.step()
  got = eng.requests[rids[1]].output_ids
  assert eng.requests[rids[1]].finish_reason == "aborted" and got == want[1][:len(got)]
  assert [eng.requests[r].output_ids for r in (rids[0], rids[2])] == [want[0], want[2]]
  assert eng.sched.allocator.num_free_blocks == eng.sched.allocator.num_total_blocks


@pytest.mark.parametrize("step_tokens", [0, 24])
def test_branch_free_steps_sample_the_same_tokens_with_no_branch(model, step_tokens):
  """RuntimeConfig.sampler "branch-free": sampled and greedy requests (the top-k window, top-p
  alone, top-k past K_MAX) get the default engine's tokens, also through the pipelined loop, and
  no compiled step holds a conditional; the default sampler ("auto") is branch-free exactly when
  the loop is pipelined on a GPU."""
  ps = prompts(1, (6, 11, 25, 9))
  sp = [SamplingParams(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=1),
        SamplingParams(max_new_tokens=10, temperature=1.2, top_p=0.8, seed=2),
        SamplingParams(max_new_tokens=10, temperature=0.7, top_k=100, seed=3),
        SamplingParams(max_new_tokens=10)]
  rt = dataclasses.replace(RT, step_tokens=step_tokens, tile=8 if step_tokens else 64)
  want = [o.output_ids for o in Engine(CFG, model, rt).generate(ps, sp)]
  for pipeline in (False, True):
    eng = Engine(CFG, model, dataclasses.replace(rt, sampler="branch-free", pipeline=pipeline))
    assert [o.output_ids for o in eng.generate(ps, sp)] == want, pipeline
    steps = list(eng._executables.values())
    assert len(steps) >= 2
    for exe in steps:
      assert "conditional(" not in exe.as_text()
  assert eng.stats.pipelined_steps > 0
  assert eng.summary()["sampler"] == "branch-free"
  assert rt.sampler == "auto"
  for sampler, pipeline, backend, free in [("auto", True, "gpu", True), ("auto", False, "gpu", False),
                                           ("auto", True, "cpu", False), ("branch", True, "gpu", False),
                                           ("branch-free", False, "cpu", True)]:
    assert resolve_branch_free(dataclasses.replace(rt, sampler=sampler, pipeline=pipeline), backend) == free
  with pytest.raises(ValueError, match="unknown sampler"):
    RuntimeConfig(sampler="sorted")


@pytest.mark.parametrize("step_tokens", [0, 24])
def test_greedy_only_steps_have_no_branch_and_the_same_tokens(model, mixed, step_tokens):
  """RuntimeConfig.greedy_only: the compiled steps hold no conditional (the default steps' choice
  between greedy and sampled rows is one, and XLA's GPU runtime waits on the host for each), the
  greedy tokens are those of the default engine, and a sampled request is refused up front."""
  ps, sps, ref = mixed
  rt = dataclasses.replace(RT, step_tokens=step_tokens, tile=8 if step_tokens else 64)
  eng = Engine(CFG, model, dataclasses.replace(rt, greedy_only=True))
  assert [o.output_ids for o in eng.generate(ps, sps)] == ref  # the default engine's tokens (test above)
  assert eng.sched.allocator.num_free_blocks == eng.sched.allocator.num_total_blocks
  steps = [eng.compiled_decode()] + [eng._executables[k] for k in eng._executables if k[0] != "decode"]
  assert len(steps) >= 2  # the decode step and at least one prefill / mixed step ran
  for exe in steps:
    assert "conditional(" not in exe.as_text()
  if not step_tokens:  # what the flag removes
    assert "conditional(" in Engine(CFG, model, rt).compiled_decode().as_text()
  with pytest.raises(RequestError, match="greedily only"):
    eng.add_request([5, 6, 7], SamplingParams(max_new_tokens=2, temperature=0.7))
  eng.add_request([5, 6, 7], SamplingParams(max_new_tokens=2, temperature=0.0, top_p=0.5, top_k=3))  # greedy anyway


@pytest.mark.parametrize("step_tokens", [0, 24])
def test_window_sampler_steps_have_no_branch_and_refuse_a_wide_top_k(model, step_tokens):
  """RuntimeConfig.sampler "window": requests with top_k in 1..64, or top_p 1, get the default
  engine's tokens (also through the pipelined loop); top_p alone gets the tokens of top_k 64 with
  that top_p; no compiled step holds a conditional; a top_k above 64 is refused up front."""
  ps = prompts(1, (6, 11, 25, 9))
  sp = [SamplingParams(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=1),
        SamplingParams(max_new_tokens=10, temperature=1.2, seed=2),
        SamplingParams(max_new_tokens=10, temperature=0.7, top_k=64, seed=3),
        SamplingParams(max_new_tokens=10)]
  rt = dataclasses.replace(RT, step_tokens=step_tokens, tile=8 if step_tokens else 64)
  want = [o.output_ids for o in Engine(CFG, model, rt).generate(ps, sp)]
  top_p_alone = [SamplingParams(max_new_tokens=10, temperature=1.5, top_p=0.95, seed=4)]
  want_p = Engine(CFG, model, rt).generate(ps[:1], [dataclasses.replace(top_p_alone[0], top_k=64)])[0].output_ids
  for pipeline in (False, True):
    eng = Engine(CFG, model, dataclasses.replace(rt, sampler="window", pipeline=pipeline))
    assert [o.output_ids for o in eng.generate(ps, sp)] == want, pipeline
    assert eng.generate(ps[:1], top_p_alone)[0].output_ids == want_p
    for exe in eng._executables.values():
      assert "conditional(" not in exe.as_text()
  assert eng.stats.pipelined_steps > 0 and eng.summary()["sampler"] == "window"
  with pytest.raises(RequestError, match="'window' sampler keeps at most the 64 most likely tokens"):
    eng.add_request([5, 6, 7], SamplingParams(max_new_tokens=2, temperature=0.7, top_k=65))
  assert eng.sched.allocator.num_free_blocks == eng.sched.allocator.num_total_blocks


def test_gpu_steps_of_many_rows_compile_with_cublas_gemms(monkeypatch):
  """On GPU, bfloat16 steps with at least CUBLAS_MIN_ROWS rows turn XLA's Triton GEMMs off (measured
  faster and quicker to compile there); fewer rows and float32 steps keep XLA's choice; the
  runtime's options win."""
  from kvrm_jax.step import steps as step_lib
  monkeypatch.setattr(step_lib.jax, "default_backend", lambda: "gpu")
  n = step_lib.CUBLAS_MIN_ROWS
  bf16 = dataclasses.replace(RT, dtype="bfloat16")
  assert step_lib.compiler_options(bf16, n - 1) is None
  assert step_lib.compiler_options(bf16, n) == {"xla_gpu_enable_triton_gemm": False}
  assert step_lib.compiler_options(RT, 4 * n) is None  # float32
  back = dataclasses.replace(bf16, xla_options=(("xla_gpu_enable_triton_gemm", True),))
  assert step_lib.compiler_options(back, 4 * n) == {"xla_gpu_enable_triton_gemm": True}


def test_each_step_gets_the_compile_options_of_its_row_count(monkeypatch):
  """build_steps asks compiler_options for each executable's GEMM rows: the batch, each decode
  bucket, prefill rows x chunk, decode rows + tiles x tile."""
  from kvrm_jax.step import steps as step_lib
  asked = []
  monkeypatch.setattr(step_lib, "compiler_options", lambda rt, rows=0: asked.append(rows) or None)
  rt = dataclasses.replace(RT, max_slots=40, decode_buckets=(8, 32), step_tokens=40 + 4 * 8, tile=8)
  graphdef, _ = nnx.split(Llama(CFG, rngs=nnx.Rngs(0)))
  decode, prefill_for, mixed_for, _, decode_for = step_lib.build_steps(graphdef, CFG, rt)
  assert asked == [40]
  decode_for(8), decode_for(32), prefill_for(32), mixed_for(4)
  assert asked == [40, 8, 32, rt.max_prefill_seqs * 32, 40 + 4 * 8]


@pytest.mark.parametrize("pipeline", [False, True])
def test_background_compiles_serve_in_larger_executables_until_ready(model, monkeypatch, pipeline):
  """compile_all(background=True) compiles the decode step over all slots and the largest tile bucket
  first; until the other steps are compiled (held back here), steps run in those two (the same tokens,
  more padding); once they are in, the smallest bucket that holds a step is used again."""
  import threading
  rt = dataclasses.replace(RT, step_tokens=RT.max_slots + 4 * 8, tile=8, decode_buckets=(2,), pipeline=pipeline)
  assert rt.tile_buckets == (1, 2, 4) and rt.decode_rows == (2, 4)
  eng = Engine(CFG, model, rt)
  gate, real = threading.Event(), eng._compile

  def held(specs, threads):
    if {k for k, _ in specs} - {("decode",), ("mixed", 4)}:
      assert gate.wait(120)
    real(specs, threads)
  monkeypatch.setattr(eng, "_compile", held)
  assert eng.compile_all(background=True)[0] == 2 and eng.compiles_pending == 3
  sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
  first, second = prompts(30, (3, 5)), prompts(31, (4, 6))
  ref = Engine(CFG, model, rt).generate(first + second, sp)

  def run(ps):
    p0, rows0 = eng.stats.prompt_positions, len(eng.stats.decode_rows)
    outs = eng.generate(ps, sp)
    return outs, eng.stats.prompt_positions - p0, set(eng.stats.decode_rows[rows0:])
  outs, positions, rows = run(first)
  assert (eng.compiles.mixed, eng.compiles.decode) == (1, 1)
  assert positions == 4 * 8 and rows == {4}  # 2 tiles in the 4-tile step; 2 slots in the 4-row step
  gate.set()
  assert eng.wait_compiled(120) and eng.compiles_pending == 0 and eng.warm_error is None
  outs2, positions, rows = run(second)
  assert (eng.compiles.mixed, eng.compiles.decode) == (3, 2)
  assert positions == 2 * 8 and rows == {2}
  assert [o.output_ids for o in outs + outs2] == [o.output_ids for o in ref]


def test_a_failed_background_compile_leaves_the_engine_serving(model, monkeypatch):
  """A step that fails to compile in the background is reported (warm_error, and a log line of the
  tools' warm-up) and never chosen: the engine serves on the executables it has."""
  import threading
  from kvrm_jax import compile_cache
  rt = dataclasses.replace(RT, step_tokens=RT.max_slots + 2 * 8, tile=8)
  eng = Engine(CFG, model, rt)
  real, told = eng._compile, []
  done = threading.Event()

  def failing(specs, threads):
    if ("mixed", 1) in {k for k, _ in specs}:
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    real(specs, threads)
  monkeypatch.setattr(eng, "_compile", failing)

  def log(line):
    told.append(line)
    if "background compile failed" in line:
      done.set()
  compile_cache.compile_all(eng, log, threads=1, background=True)
  assert not eng.wait_compiled(120) and eng.compiles_pending == 1
  assert isinstance(eng.warm_error, RuntimeError) and done.wait(60)
  assert "RESOURCE_EXHAUSTED" in told[-1] and "the 1 step left runs in the larger executables" in told[-1], told
  sp = SamplingParams(max_new_tokens=5, ignore_eos=True)
  ps = prompts(32, (3, 9))
  assert [o.output_ids for o in eng.generate(ps, sp)] == [o.output_ids for o in Engine(CFG, model, rt).generate(ps, sp)]
  assert eng.compiles.mixed == 1 and eng.compiles_pending == 1
