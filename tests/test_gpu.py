"""GPU end-to-end: the engine's decode step on the Pallas kernels against the reference path.

Marked `gpu`: skipped on CPU (conftest), run on the device machine with `pytest -m gpu`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_prompts

from kvrm_jax.config import ModelConfig, RuntimeConfig
from kvrm_jax.engine import Engine
from kvrm_jax.model.llama import Llama
from kvrm_jax.sched.request import SamplingParams
from kvrm_jax.step import steps as step_lib

pytestmark = pytest.mark.gpu

RT = dict(block_size=16, num_blocks=96, max_slots=4, max_blocks_per_seq=16, max_groups=2, prefill_buckets=(16, 64))


def _prompts(n_vocab, lengths, seed=0):
  return random_prompts(seed, lengths, vocab=n_vocab)


def test_float32_greedy_tokens_equal_cpu_reference():
  """float32 (the Mosaic kernel is bf16/f16-only, so f32 runs the generic Pallas kernel on the
  Triton backend) against the reference path on the CPU device of the same process."""
  cfg = ModelConfig.from_name("tiny")
  ps = _prompts(cfg.vocab_size, (5, 33, 17, 70))
  sp = SamplingParams(max_new_tokens=24, ignore_eos=True)
  gpu = Engine(cfg, Llama(cfg, rngs=nnx.Rngs(0)), RuntimeConfig(**RT, attention="pallas"))
  got = [o.output_ids for o in gpu.generate(ps, sp)]
  with jax.default_device(jax.devices("cpu")[0]):
    cpu = Engine(cfg, Llama(cfg, rngs=nnx.Rngs(0)), RuntimeConfig(**RT, attention="reference"))
    want = [o.output_ids for o in cpu.generate(ps, sp)]
  assert got == want
  assert gpu.compiles.decode == 1


@pytest.mark.parametrize("plan", ["descriptor", "table"])
def test_bfloat16_mosaic_logits_close_to_reference(plan, monkeypatch):
  """bf16 with head_dim 64 takes the Mosaic GPU kernel; logits of every step stay close to the
  reference path's (same GPU), and greedy tokens agree. plan "table": no descriptor prebuilt for
  the step, so each layer's kernel plans from the block table the step slices out of its packed
  descriptor (without paged_attention's optimization barrier XLA handed the kernel that slice
  as an unaligned pointer, which Mosaic refused)."""
  if plan == "table":
    monkeypatch.setattr(step_lib, "decode_descriptors", lambda *a, **k: None)
  cfg = dataclasses.replace(ModelConfig.from_name("tiny"), head_dim=64, num_heads=6, num_kv_heads=2)
  model = Llama(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
  ps = _prompts(cfg.vocab_size, (9, 40, 3, 66), seed=1)
  sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
  logits, toks = {}, {}
  for att in ("reference", "pallas"):  # pallas teacher-forced on reference's tokens: same inputs
    eng = Engine(cfg, model, RuntimeConfig(**RT, dtype="bfloat16", attention=att), with_logits=True)
    rids = [eng.add_request(p, sp, forced_output=toks["reference"][i] if att == "pallas" else None)
            for i, p in enumerate(ps)]
    rows = []
    while eng.has_work():
      eng.step()
      rows.append(np.stack([eng.last_logits.get(r, np.zeros(cfg.vocab_size)) for r in rids]))
    logits[att], toks[att] = np.stack(rows), [eng.requests[r].output_ids for r in rids]
  rel = np.linalg.norm(logits["pallas"] - logits["reference"]) / np.linalg.norm(logits["reference"])
  assert rel < 2e-2, rel
  assert np.mean(logits["pallas"].argmax(-1) == logits["reference"].argmax(-1)) >= 0.9


@pytest.mark.parametrize("step_tokens", [0, 4 + 4 * 16])
def test_bfloat16_prompt_tile_kernel_logits_close_to_reference(step_tokens):
  """Prompt chunks through the Mosaic tile kernel (G = 4 q heads per kv head: pieces of 16 tokens),
  in prefill calls and in mixed-step tiles of 16: logits of every step stay close to the reference
  path's (gather, same GPU), teacher-forced on its tokens, and greedy tokens agree."""
  from pallas_kernels import paged_attention as pa
  cfg = dataclasses.replace(ModelConfig.from_name("tiny"), head_dim=64, num_heads=8, num_kv_heads=2)
  model = Llama(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(2))
  assert pa.tile_backend((1, 16, 8, 64), jnp.bfloat16, (2, 96, 16, 64), 16) == "mosaic"
  ps = _prompts(cfg.vocab_size, (9, 40, 3, 66, 150), seed=2)
  sp = SamplingParams(max_new_tokens=10, ignore_eos=True)
  logits, toks = {}, {}
  for att in ("reference", "pallas"):
    kw = dict(step_tokens=step_tokens, tile=16, prompt_attention="kernel") if att == "pallas" else {}
    eng = Engine(cfg, model, RuntimeConfig(**RT, dtype="bfloat16", attention=att, **kw), with_logits=True)
    rids = [eng.add_request(p, sp, forced_output=toks["reference"][i] if att == "pallas" else None)
            for i, p in enumerate(ps)]
    rows = []
    while eng.has_work():
      eng.step()
      rows.append({i: eng.last_logits[r] for i, r in enumerate(rids) if r in eng.last_logits})
    logits[att], toks[att] = rows, [eng.requests[r].output_ids for r in rids]
    if att == "pallas":
      assert (eng.stats.mixed_steps > 0) == bool(step_tokens)
  # Steps differ between the two engines (mixed steps batch prompts differently): compare each
  # request's logits token by token.
  per = {att: {} for att in logits}
  for att, rows in logits.items():
    for row in rows:
      for r, lg in row.items():
        per[att].setdefault(r, []).append(lg)
  a = np.concatenate([np.stack(per["pallas"][r]) for r in sorted(per["reference"])])
  b = np.concatenate([np.stack(per["reference"][r]) for r in sorted(per["reference"])])
  rel = np.linalg.norm(a - b) / np.linalg.norm(b)
  assert rel < 2e-2, rel
  assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.9


def test_host_tier_on_gpu_same_tokens():
  """The host tier on the GPU (pinned_host pools, placement staging inside the step, swaps):
  greedy float32 tokens equal the tier-off engine's on a pool large enough to need no tier."""
  from kvrm_jax.step import tier
  cfg = ModelConfig.from_name("tiny")
  model = Llama(cfg, rngs=nnx.Rngs(0))
  ps = _prompts(cfg.vocab_size, (5, 17, 40, 3, 70, 16, 9))
  sp = SamplingParams(max_new_tokens=20, ignore_eos=True)
  base = dict(block_size=8, max_slots=4, max_blocks_per_seq=16, max_groups=2, prefill_buckets=(8, 32),
              attention="reference")
  want = [o.output_ids for o in Engine(cfg, model, RuntimeConfig(num_blocks=96, **base)).generate(ps, sp)]
  assert tier.host_memory_kind() == "pinned_host"
  for kw in (dict(max_host_reads=8, max_host_blocks_per_seq=8), {}):  # placement + swap, swap only
    eng = Engine(cfg, model, RuntimeConfig(num_blocks=15, host_blocks=64, host_extent=2, max_swap_extents=8,
                                           **kw, **base))
    assert eng.k_host.sharding.memory_kind == "pinned_host"
    assert [o.output_ids for o in eng.generate(ps, sp)] == want
    assert eng.stats.placed_blocks + eng.stats.swap_preemptions > 0
