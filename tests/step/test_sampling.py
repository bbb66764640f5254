"""On-device sampling (kvrm_jax/sampling.py) against a NumPy reference of its definition."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

stats = pytest.importorskip("scipy.stats", reason="the sampling tests need scipy (pip install -e '.[test]')")

from kvrm_jax.step import sampling  # noqa: E402
from kvrm_jax.sched.request import NON_FINITE  # noqa: E402
from kvrm_jax.step.sampling import sample  # noqa: E402


def ref_kept(x, k, p):
  """NumPy reference of the kept set of one row, and its distance to the nearest top-p boundary
  (rows whose mass lies within float32 rounding of top_p are ambiguous by definition)."""
  x = np.asarray(x, np.float64)
  above_count = (x[None, :] > x[:, None]).sum(-1)  # [V] tokens strictly above each token
  in_k = above_count < k if k > 0 else np.ones_like(x, bool)
  e = np.exp(x - x.max())
  z = e[in_k].sum()
  above_mass = ((x[None, :] > x[:, None]) * (e * in_k)[None, :]).sum(-1) / z  # [V]
  if p >= 1:
    return in_k, np.inf
  return in_k & (above_mass < p), np.min(np.abs(above_mass[in_k] - p))


def random_rows(rng, b, v, ties):
  x = rng.normal(size=(b, v)).astype(np.float32) * 3
  if ties:  # a coarse grid: many exact ties, also at the thresholds
    x = np.round(x * 2) / 2
  k = rng.choice([0, 1, 2, 5, sampling.K_MAX, sampling.K_MAX + 37, v], size=b).astype(np.int32)
  p = rng.choice([1.0, 0.999, 0.9, 0.5, 0.2, 1e-4], size=b).astype(np.float32)
  return x, k, p


@pytest.mark.parametrize("branch_free,ways", [(False, None), (True, None), (True, 2), (True, 4)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("v,chunk", [(40, sampling.CHUNK), (700, sampling.CHUNK), (700, 2)])
def test_kept_set_matches_reference(v, chunk, ties, branch_free, ways):
  """chunk 2 at v 700 takes top_window's chunked route (350 chunks of 2 columns); branch_free
  searches with no lax.cond (BRANCH_FREE_WAYS ways, or `ways`)."""
  rng = np.random.default_rng(v + ties)
  x, k, p = random_rows(rng, 96, v, ties)
  got = np.asarray(jax.jit(functools.partial(sampling.kept_mask, chunk=chunk, branch_free=branch_free, ways=ways))(
      jnp.asarray(x), jnp.asarray(k), jnp.asarray(p)))
  checked = 0
  for i in range(len(x)):
    want, margin = ref_kept(x[i], int(k[i]), float(p[i]))
    if margin < 1e-5:
      continue
    checked += 1
    assert (got[i] == want).all(), (i, k[i], p[i], np.flatnonzero(got[i] != want))
  assert checked >= 80


@pytest.mark.parametrize("kind", ["normal", "ties", "flat"])
def test_top_window_equals_a_full_sort(kind):
  """The chunked route (V = 40,000, not a multiple of CHUNK) gives the K_MAX largest values with
  their multiplicities, ties across chunks and -inf columns included."""
  rng = np.random.default_rng(len(kind))
  b, v = 3, 40_000
  x = rng.normal(size=(b, v)).astype(np.float32)
  if kind == "ties":
    x = rng.integers(0, 4, size=(b, v)).astype(np.float32)  # ~10,000 columns tied at the top
    x[1, rng.choice(v, 30, replace=False)] = 9.0  # 30 above the tie: the threshold falls inside it
  elif kind == "flat":
    x[:] = 1.5
  x[:, rng.choice(v, 1000, replace=False)] = -np.inf
  assert -(-v // sampling.CHUNK) >= 4 * sampling.K_MAX  # the chunked route is the one under test
  got = np.asarray(jax.jit(sampling.top_window, static_argnums=1)(jnp.asarray(x), sampling.K_MAX))
  want = -np.sort(-x, axis=-1)[:, :sampling.K_MAX]
  assert (got == want).all()


def test_ties_at_threshold_kept_together():
  x = jnp.asarray([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0] + [-5.0] * 100])
  k = jnp.asarray([2], jnp.int32)  # the 2nd value is tied three ways: all three kept
  got = np.asarray(sampling.kept_mask(x, k, jnp.asarray([1.0])))
  assert np.flatnonzero(got[0]).tolist() == [0, 2, 3, 4]
  # top-p route by bisection (top_k 0): the tied tokens share their mass-above
  e = np.exp(np.asarray(x[0]) - 3.0)
  p = (e[0] + 0.5 * e[2]) / e.sum()  # mass above the tied ones is e[0] < p: all three kept
  got = np.asarray(sampling.kept_mask(x, jnp.asarray([0], jnp.int32), jnp.asarray([p], jnp.float32)))
  assert np.flatnonzero(got[0]).tolist() == [0, 2, 3, 4]


@pytest.mark.parametrize("k", [0, 10, sampling.K_MAX + 1])
def test_top_p_keeps_exactly_one(k):
  rng = np.random.default_rng(k)
  x = rng.normal(size=(3, 500)).astype(np.float32)
  q_max = np.exp(x.max(-1)) / np.exp(x).sum(-1)
  p = (0.5 * q_max).astype(np.float32)  # below the top token's probability: only it is kept
  got = np.asarray(sampling.kept_mask(jnp.asarray(x), jnp.full(3, k, jnp.int32), jnp.asarray(p)))
  assert (got.sum(-1) == 1).all() and (got.argmax(-1) == x.argmax(-1)).all()
  toks = sample(jnp.asarray(x), jnp.ones(3), jnp.full(3, k, jnp.int32), jnp.asarray(p),
                jnp.arange(3, dtype=jnp.int32), jnp.zeros(3, jnp.int32))
  assert np.asarray(toks).tolist() == x.argmax(-1).tolist()


@pytest.mark.parametrize("branch_free", [False, True])
@pytest.mark.parametrize("k,p,temp", [(0, 1.0, 1.0), (5, 1.0, 0.7), (0, 0.8, 1.3), (8, 0.9, 1.0),
                                      (sampling.K_MAX + 3, 0.95, 1.0)])
def test_sampled_distribution(k, p, temp, branch_free):
  """Many seeds on one row: never outside the kept set, and frequencies pass a chi-square test
  against softmax(x) renormalised over the kept set (a mask off by one token fails either)."""
  v, n = 80, 20000
  rng = np.random.default_rng(7)
  logits = np.sort(rng.normal(size=v).astype(np.float32))[::-1] * 1.5
  logits = rng.permutation(logits)  # vocabulary order is not value order
  x = logits / temp
  want, margin = ref_kept(x, k, p)
  assert margin > 1e-4
  f = jax.jit(functools.partial(sample, branch_free=branch_free))
  toks = np.asarray(f(jnp.broadcast_to(jnp.asarray(logits), (n, v)), jnp.full(n, temp), jnp.full(n, k, jnp.int32),
                      jnp.full(n, p), jnp.arange(n, dtype=jnp.int32), jnp.full(n, 11, jnp.int32)))
  counts = np.bincount(toks, minlength=v)
  assert counts[~want].sum() == 0
  q = np.exp(x.astype(np.float64) - x.max()) * want
  q /= q.sum()
  if want.sum() > 1:
    chi = stats.chisquare(counts[want], q[want] * n)
    assert chi.pvalue > 1e-4, chi


def test_greedy_rows_unaffected_and_key_is_seed_and_position():
  rng = np.random.default_rng(3)
  b, v = 8, 300
  x = jnp.asarray(rng.normal(size=(b, v)).astype(np.float32))
  temp = jnp.asarray([0, 1, 0, 0.5, 0, 2, 0, 1], jnp.float32)
  k = jnp.asarray([0, 0, 3, 10, 100, 0, 1, 200], jnp.int32)
  p = jnp.asarray([1, 0.5, 0.9, 1, 0.3, 0.9, 1, 0.8], jnp.float32)
  seeds, pos = jnp.arange(b, dtype=jnp.int32) * 13, jnp.arange(b, dtype=jnp.int32) + 5
  toks = np.asarray(sample(x, temp, k, p, seeds, pos))
  greedy = np.asarray(x).argmax(-1)
  assert (toks[np.asarray(temp) == 0] == greedy[np.asarray(temp) == 0]).all()
  # one row alone, or the same rows reversed, draws the same tokens: the key is (seed, position)
  rev = np.asarray(sample(x[::-1], temp[::-1], k[::-1], p[::-1], seeds[::-1], pos[::-1]))[::-1]
  assert (rev == toks).all()
  one = np.asarray(sample(x[1:2], temp[1:2], k[1:2], p[1:2], seeds[1:2], pos[1:2]))
  assert one[0] == toks[1]


def test_no_sort_over_the_vocabulary():
  """Neither the program nor what the backend compiles sorts V columns: on CPU the top-k's are
  TopK calls, on a GPU XLA sorts the top_k inputs (>16 of them kept), which top_window keeps to
  K_MAX * CHUNK columns."""
  b, v = 4, 40_000
  args = (jnp.zeros((b, v)), jnp.ones(b), jnp.full(b, 50, jnp.int32), jnp.full(b, 0.9), jnp.zeros(b, jnp.int32),
          jnp.zeros(b, jnp.int32))
  lowered = jax.jit(sample).lower(*args)
  assert "stablehlo.sort" not in lowered.as_text()
  assert "chlo.top_k" in lowered.as_text()  # the top-k route is there
  sorts = [line for line in lowered.compile().as_text().splitlines() if " sort(" in line]
  widest = max((int(d) for line in sorts for d in re.findall(r"\[\d+,(\d+)\]", line.split(" sort(")[0])), default=0)
  assert widest <= sampling.K_MAX * sampling.CHUNK < v, sorts


def test_greedy_only_is_the_argmax_with_no_branch():
  """sample(greedy_only=True) (RuntimeConfig.greedy_only): every row's argmax, NON_FINITE for a row of
  non-finite logits as on the default path, and no conditional in the program."""
  rng = np.random.default_rng(4)
  b, v = 6, 300
  x = rng.normal(size=(b, v)).astype(np.float32)
  x[2, 7] = np.nan
  x[4, 9] = np.inf
  zeros, ones = jnp.zeros(b, jnp.int32), jnp.ones(b, jnp.float32)
  args = (jnp.asarray(x), jnp.zeros(b, jnp.float32), zeros, ones, zeros, zeros)
  toks = np.asarray(sample(*args, greedy_only=True))
  assert (toks == np.asarray(sample(*args))).all()
  want = x.argmax(-1)
  want[[2, 4]] = NON_FINITE
  assert (toks == want).all()

  def branches(fn):
    text = jax.jit(fn).lower(*args).as_text()
    return text.count("stablehlo.case") + text.count("stablehlo.if")

  assert branches(functools.partial(sample, greedy_only=True)) == 0
  assert branches(sample) > 0  # the default program's choice between greedy and sampled rows


def test_branch_free_draws_the_same_tokens_with_no_branch():
  """sample(branch_free=True) (RuntimeConfig.sampler "branch-free"): every route (greedy rows, the
  top-k window, top-k past K_MAX, top-p alone) gives the default program's tokens, with no
  conditional in the program; its 16-way search finds the bisection's thresholds."""
  rng = np.random.default_rng(5)
  b, v = 12, 3000
  x = rng.normal(size=(b, v)).astype(np.float32) * 2
  x[3, 11] = np.nan
  temp = jnp.asarray([0, 1, 0.7, 1.3, 0, 0.9, 1, 1, 2, 0.5, 1, 1], jnp.float32)
  k = jnp.asarray([0, 0, 5, sampling.K_MAX + 40, 3, 0, 1, 2000, 0, 50, 0, 64], jnp.int32)
  p = jnp.asarray([1, 0.9, 1, 0.95, 0.5, 0.3, 1, 0.8, 0.999, 0.9, 1, 0.2], jnp.float32)
  seeds, pos = jnp.arange(b, dtype=jnp.int32) * 7, jnp.arange(b, dtype=jnp.int32) + 3
  args = (jnp.asarray(x), temp, k, p, seeds, pos)
  want = np.asarray(jax.jit(sample)(*args))
  got = np.asarray(jax.jit(functools.partial(sample, branch_free=True))(*args))
  assert (got == want).all(), (got, want)
  assert got[3] == NON_FINITE
  text = jax.jit(functools.partial(sample, branch_free=True)).lower(*args).as_text()
  assert text.count("stablehlo.case") + text.count("stablehlo.if") == 0

  xs = jnp.asarray(np.round(rng.normal(size=(b, v)) * 4) / 4, jnp.float32)  # ties
  for pred in (lambda t: jnp.sum(xs[:, None, :] > t[:, :, None], axis=-1) < k[:, None] + 1,
               lambda t: jnp.sum(jnp.where(xs[:, None, :] > t[:, :, None], jnp.exp(xs)[:, None, :], 0.0), axis=-1)
               < p[:, None] * jnp.sum(jnp.exp(xs), axis=-1)[:, None]):
    assert (np.asarray(sampling._search(xs, pred, 16)) == np.asarray(sampling._search(xs, pred, 2))).all()


def window_k(k, p):
  """The top_k that sampler "window" applies: top_k in 1..K_MAX as is (above: K_MAX), top_k 0 with
  top_p < 1 the window of K_MAX, top_k 0 with top_p 1 off."""
  return min(k, sampling.K_MAX) if k > 0 else (sampling.K_MAX if p < 1 else 0)


@pytest.mark.parametrize("ties", [False, True])
def test_window_kept_set_matches_reference(ties):
  """kept_mask(window=True) (RuntimeConfig.sampler "window"): the reference kept set with top_k
  mapped by window_k; no search runs, on the chunked top-k window route (V 700, chunks of 2)."""
  rng = np.random.default_rng(11 + ties)
  x, k, p = random_rows(rng, 96, 700, ties)
  got = np.asarray(jax.jit(functools.partial(sampling.kept_mask, chunk=2, window=True))(
      jnp.asarray(x), jnp.asarray(k), jnp.asarray(p)))
  checked = 0
  for i in range(len(x)):
    want, margin = ref_kept(x[i], window_k(int(k[i]), float(p[i])), float(p[i]))
    if margin < 1e-5:
      continue
    checked += 1
    assert (got[i] == want).all(), (i, k[i], p[i], np.flatnonzero(got[i] != want))
  assert checked >= 80


def test_window_draws_the_default_tokens_where_the_definitions_agree():
  """sample(window=True): no conditional and none of the searches' loops in the program; the default program's
  tokens for greedy rows, top_k in 1..K_MAX and top_p 1 with top_k 0; for top_p alone the tokens of
  top_k = K_MAX with that top_p, which a nucleus wider than the window changes."""
  rng = np.random.default_rng(6)
  b, v = 10, 3000
  x = rng.normal(size=(b, v)).astype(np.float32) * 0.3  # flat: top-p 0.9 keeps far more than 64 tokens
  temp = jnp.asarray([0, 1, 0.7, 1.3, 0, 0.9, 1, 2, 0.5, 1], jnp.float32)
  k = jnp.asarray([0, 0, 5, sampling.K_MAX, 3, 0, 1, 0, 50, 0], jnp.int32)
  p = jnp.asarray([1, 1, 1, 0.95, 0.5, 0.9, 1, 0.999, 0.9, 0.3], jnp.float32)
  seeds, pos = jnp.arange(b, dtype=jnp.int32) * 7, jnp.arange(b, dtype=jnp.int32) + 3
  args = (jnp.asarray(x), temp, k, p, seeds, pos)
  fn = jax.jit(functools.partial(sample, window=True))
  got = np.asarray(fn(*args))
  want = np.asarray(jax.jit(sample)(*args))
  same = np.asarray([window_k(int(a), float(c)) == int(a) for a, c in zip(k, p)])
  assert (got[same] == want[same]).all(), (got, want)
  k_win = jnp.asarray([window_k(int(a), float(c)) for a, c in zip(k, p)], jnp.int32)
  assert (got == np.asarray(jax.jit(sample)(jnp.asarray(x), temp, k_win, p, seeds, pos))).all()
  assert np.asarray(sampling.kept_mask(jnp.asarray(x[5:6] / 0.9), k[5:6], p[5:6])).sum() > sampling.K_MAX
  text = fn.lower(*args).as_text()
  assert text.count("stablehlo.case") + text.count("stablehlo.if") == 0
  searches = jax.jit(functools.partial(sample, branch_free=True)).lower(*args).as_text().count("stablehlo.while")
  assert text.count("stablehlo.while") == searches - 2  # the random draw's loops only, not the two searches
