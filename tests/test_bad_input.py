"""Bad input through the Python API: a ValueError/RequestError with a clear message, nothing queued,
nothing leaked (the pool whole afterwards), and no silent wrong answer."""

import math

import jax.numpy as jnp
import pytest
from flax import nnx

from kvrm_jax.config import ModelConfig, RuntimeConfig
from kvrm_jax.engine import Engine
from kvrm_jax.model import reference
from kvrm_jax.model.llama import Llama
from kvrm_jax.sched.request import RequestError, SamplingParams

CFG = ModelConfig.from_name("tiny")
RT = RuntimeConfig(block_size=8, num_blocks=32, max_slots=2, max_blocks_per_seq=8, prefill_buckets=(8, 32))
PROMPT = [5, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def model():
  return Llama(CFG, rngs=nnx.Rngs(0))


def assert_whole(eng):
  assert not eng.has_work() and not eng.sched.waiting
  assert eng.sched.allocator.num_free_blocks == eng.sched.allocator.num_total_blocks


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=math.nan), "temperature must be a finite number"),
    (dict(temperature=math.inf), "temperature must be a finite number"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=math.nan), "top_p must be a finite number"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
    (dict(max_new_tokens=8.0), "max_new_tokens must be an integer"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(stop="END"), "stop must be a tuple of strings"),
])
def test_sampling_params_validate_themselves(kw, msg):
  with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
    SamplingParams(**kw)


@pytest.mark.parametrize("ids, msg", [
    ([1.5, 2.7, 300.9], "integer token ids"),
    ([True, False], "integer token ids"),
    ("Hello", "integer token ids"),
    (["5", "6"], "integer token ids"),
    (7, "integer token ids"),
    ([5, CFG.vocab_size], "token ids must be in"),
])
def test_add_request_rejects_non_integer_ids(model, ids, msg):
  eng = Engine(CFG, model, RT)
  with pytest.raises(RequestError, match=msg):
    eng.add_request(ids, SamplingParams(max_new_tokens=2))
  assert_whole(eng)
  assert not eng.requests


def test_top_k_over_the_vocabulary_is_rejected(model):
  eng = Engine(CFG, model, RT)
  with pytest.raises(RequestError, match=f"top_k=1000000 exceeds the vocabulary of {CFG.vocab_size}"):
    eng.add_request(PROMPT, SamplingParams(top_k=10**6, temperature=1.0))
  assert_whole(eng)


def test_abort_unknown_id_is_a_clear_error(model):
  eng = Engine(CFG, model, RT)
  with pytest.raises(RequestError, match="no request with id 12345"):
    eng.abort(12345)


def test_generate_is_all_or_nothing(model):
  """A batch with one prompt over the context raises and queues nothing: the next generate() runs
  only its own prompts, and the pool is whole after both."""
  eng = Engine(CFG, model, RT)
  too_long = list(range(3, 3 + RT.max_seq_len))
  with pytest.raises(RequestError, match="exceeds the context limit"):
    eng.generate([PROMPT, too_long], SamplingParams(max_new_tokens=4))
  assert_whole(eng)
  assert not eng.requests
  other = [9, 8, 7]
  [out] = eng.generate([other], SamplingParams(max_new_tokens=4))
  assert out.prompt_ids == other and len(out.output_ids) == 4
  assert [r.prompt_ids for r in eng.requests.values()] == [other]
  assert eng.summary()["generated_tokens"] == 4
  assert_whole(eng)


def _with_nan_embedding_row(model, token):
  graphdef, state = nnx.split(model)
  bad = nnx.merge(graphdef, state)
  bad.embed[...] = bad.embed[...].at[token].set(jnp.nan)
  return bad


def test_non_finite_logits_end_the_request_with_error(model):
  """Greedy: the first token t comes from a clean prefill; with t's embedding row NaN, the decode
  step that reads t yields NaN logits: the request ends with finish_reason "error" after t, and
  a request in the same batch that never reads the row is untouched."""
  sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
  ref = reference.greedy_generate(model, PROMPT, 6, ())
  t = ref[0]
  clean = next(p for p in ([3, 4, 5], [10, 11], [20, 21, 22]) if t not in reference.greedy_generate(model, p, 6, ())
               and t not in p)
  eng = Engine(CFG, _with_nan_embedding_row(model, t), RT)
  bad, good = eng.generate([PROMPT, clean], sp)
  assert bad.finish_reason == "error" and bad.output_ids == [t]
  assert good.finish_reason == "length" and good.output_ids == reference.greedy_generate(model, clean, 6, ())
  assert_whole(eng)
  # A NaN row in the prompt itself: the prefill's logits are NaN, no token at all.
  [out] = eng.generate([[t] + PROMPT], sp)
  assert out.finish_reason == "error" and out.output_ids == []
  assert_whole(eng)


def test_the_jitted_decode_step_documents_itself(model):
  """A notebook user introspecting the step learns its arguments and outputs, not functools.partial's."""
  step = Engine(CFG, model, RT).decode_step
  assert step.__doc__.startswith("One decode step of every slot: (state, k_pool, v_pool, ints, floats")
  assert "NON_FINITE" in step.__doc__ and "partial" not in step.__doc__
