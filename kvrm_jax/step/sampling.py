"""On-device per-row sampling (temperature, top-k, top-p) with no sort over the vocabulary.

The kept set of a row is defined by value thresholds on the scaled logits x = logits / temperature,
ties included:

  top-k  keep token i iff fewer than top_k tokens have x > x_i        (top_k 0 = off)
  top-p  keep token i iff the probability mass of the top-k-kept tokens with x > x_i is < top_p,
         probabilities renormalised over the top-k-kept set          (top_p 1 = off)

so the most likely token is always kept and tokens tied at a boundary are all kept or all dropped.
The token is then drawn by Gumbel-max over the kept set in vocabulary order,
`jax.random.categorical(key, where(kept, x, -inf))`, with key = fold_in(key(seed), position).

Two routes find the thresholds, both exact (no sort of V columns):
  * top_k in 1..K_MAX: the K_MAX largest values of x (`top_window`) give the k-th value (the top-k
    threshold) and the candidates; top-p is decided among those K_MAX candidates. `top_window`
    takes the K_MAX chunks of CHUNK columns with the largest maxima and runs `lax.top_k` on their
    K_MAX * CHUNK values only: XLA's GPU backend lowers a `lax.top_k` with k > 16 to a sort of its
    whole input, which over V columns would be the full sort this module avoids.
  * top_k 0 or > K_MAX: a search over the float32 bit patterns of x finds the smallest threshold
    whose predicate holds: a bisection (32 rounds, each one masked reduction over V) that only runs
    (lax.cond) when a row of the batch needs it, or, branch-free, a 16-way search (8 rounds, each
    15 masked reductions in one pass over V) that always runs.

Branch-free sampling (`branch_free=True`, RuntimeConfig.sampler "branch-free") draws the same
tokens with no `lax.cond` in the program: the stochastic path and both searches always run and
`where` picks each row's result. A conditional makes XLA's GPU runtime copy its predicate to the
host and wait for the device (docs/step.md, "Where the host waits"); without one a step call
returns at once, at the price of computing every route on every step.

Window sampling (`window=True`, RuntimeConfig.sampler "window") never searches over V: a row's
kept set is taken within its K_MAX most likely tokens. top_k in 1..K_MAX and top_p 1 keep the
definition above; top_k 0 with top_p < 1 takes the top-p nucleus of the K_MAX-token window
(probabilities renormalised over it, as top_k = K_MAX would); top_k above K_MAX is refused by the
scheduler. No branch either: the window route is cheap enough to run on every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvrm_jax.config import SAMPLER_WINDOW
from kvrm_jax.sched.request import NON_FINITE  # the token id of a row of non-finite logits

# Rows with 1 <= top_k <= K_MAX take the top-k window route; the rest search over V.
K_MAX = SAMPLER_WINDOW
CHUNK = 128  # columns per chunk of top_window's first stage
BRANCH_FREE_WAYS = 16  # the cheapest branch-free search on an H100 of 2, 4 and 16 ways (scripts/bench_sampler.py)


def top_window(x, k, chunk: int = CHUNK):
  """The k largest values of each row, descending (ties repeated), as `lax.top_k(x, k)[0]`, without
  a sort over V: [B, V] -> [B, k].

  Exact: let L be the k-th largest of the chunk maxima. At least k values are >= L, so the k-th
  largest value t >= L, and every value > L lies in a chunk whose maximum is > L (fewer than k such
  chunks, all taken). If t > L, all k values >= t are in the taken chunks; if t == L, the taken
  chunks hold every value > L and one value == L per taken chunk with maximum L, k or more in all."""
  b, v = x.shape
  n_chunks = -(-v // chunk)
  if n_chunks < 4 * k:  # small vocabularies: one top_k over the row is no larger
    return jax.lax.top_k(x, k)[0]
  xp = jnp.pad(x, ((0, 0), (0, n_chunks * chunk - v)), constant_values=-jnp.inf).reshape(b, n_chunks, chunk)
  _, chunks = jax.lax.top_k(jnp.max(xp, axis=-1), k)  # [B, k] chunk ids
  cand = jnp.take_along_axis(xp, chunks[:, :, None], axis=1).reshape(b, k * chunk)
  return jax.lax.top_k(cand, k)[0]


def _order_key(x):
  """float32 -> uint32 with the same order (NaN aside)."""
  b = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def _from_order_key(u):
  b = jnp.where(u >> 31 == 1, u & jnp.uint32(0x7FFFFFFF), ~u)
  return jax.lax.bitcast_convert_type(b, jnp.float32)


def _search(x, pred, ways: int = 2):
  """Per row, the smallest float t (among the values between the row's min and max of x) with
  pred(t) true; pred: [B, M] thresholds -> [B, M] bool, monotone in t (false ... false true ...
  true) and true at the row max. Each round evaluates pred at ways - 1 cut points of the remaining
  interval of float32 order keys (a bisection for ways=2) until one key is left. x: [B, V] f32 -> [B] f32."""
  lo = _order_key(jnp.min(x, axis=-1))  # [B]
  hi = _order_key(jnp.max(x, axis=-1))  # [B]
  bits = ways.bit_length() - 1
  if ways < 2 or ways != 1 << bits:
    raise ValueError(f"ways must be a power of two >= 2, got {ways}")
  j = jnp.arange(1, ways, dtype=jnp.uint32)  # [M] cut points j * width / ways, exact in uint32
  rounds = -(-32 // bits)  # a round leaves at most floor(width / ways) + 1 keys: exact over 2**32 keys

  def body(_, lh):
    lo, hi = lh
    w = hi - lo  # no overflow: hi >= lo
    cut = lo[:, None] + (w >> bits)[:, None] * j + (((w & (ways - 1))[:, None] * j) >> bits)  # [B, M]
    ok = pred(_from_order_key(cut))
    return (jnp.max(jnp.where(ok, lo[:, None], cut + 1), axis=-1),  # past every cut that fails
            jnp.min(jnp.where(ok, cut, hi[:, None]), axis=-1))  # the first cut that holds

  _, hi = jax.lax.fori_loop(0, rounds, body, (lo, hi))
  return _from_order_key(hi)


def kept_mask(x, top_k, top_p, chunk: int = CHUNK, branch_free: bool = False, ways: int | None = None,
              window: bool = False):
  """The kept set of each row (definition in the module docstring). x: [B, V] f32 scaled logits;
  top_k: [B] int32 (0 = off); top_p: [B] f32 in (0, 1] (1 = off) -> [B, V] bool. `chunk`: columns
  per chunk of `top_window`. branch_free: the searches of rows off the window route always run
  instead of behind a `lax.cond`. ways: the searches' cut points per round plus one (a power of
  two; default BRANCH_FREE_WAYS branch-free, else 2: a bisection); every choice finds the same
  thresholds. window: the kept set within the K_MAX most likely tokens, no search (module
  docstring); a top_k above K_MAX counts as K_MAX."""
  b, v = x.shape
  kmax = min(K_MAX, v)
  if window:  # top_k 0 with top_p < 1: the nucleus of the window; top_k 0 with top_p 1: every token
    top_k = jnp.where(top_k > 0, jnp.minimum(top_k, kmax), jnp.where(top_p < 1.0, kmax, 0))
  neg_inf = jnp.full((b,), -jnp.inf, jnp.float32)
  in_window = (top_k > 0) & (top_k <= kmax)  # [B]
  p_on = top_p < 1.0  # [B]
  e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))  # [B, V] unnormalised probabilities
  ways = ways or (BRANCH_FREE_WAYS if branch_free else 2)

  def search_if(needed, pred):  # the threshold of rows that need a search (others: -inf)
    if window:  # no row needs one: every top_k is in 0..kmax, and top_p < 1 has one
      return neg_inf
    run = lambda: _search(x, pred, ways)  # noqa: E731
    return run() if branch_free else jax.lax.cond(jnp.any(needed), run, lambda: neg_inf)

  vals = top_window(x, kmax, chunk)  # [B, kmax] descending
  t_k_win = jnp.take_along_axis(vals, jnp.clip(top_k - 1, 0, kmax - 1)[:, None], axis=-1)[:, 0]
  # k-th largest value for top_k > kmax: count(x > t) < k
  t_k_far = search_if(top_k > kmax, lambda t: jnp.sum(x[:, None, :] > t[:, :, None], axis=-1) < top_k[:, None])
  t_k = jnp.where(in_window, t_k_win, jnp.where(top_k > kmax, t_k_far, neg_inf))
  in_k = x >= t_k[:, None]  # [B, V]
  z_k = jnp.sum(jnp.where(in_k, e, 0.0), axis=-1)  # [B] mass of the top-k set
  budget = top_p * z_k  # [B] "mass above < top_p" as "unnormalised mass above < top_p * z_k"

  # Window route: mass above each candidate, from the candidates (all tokens above a candidate are
  # candidates themselves).
  e_w = jnp.exp(vals - jnp.max(x, axis=-1, keepdims=True))  # [B, kmax]
  w_in = vals >= t_k[:, None]
  above = jnp.sum(jnp.where((vals[:, None, :] > vals[:, :, None]) & w_in[:, None, :], e_w[:, None, :], 0.0),
                  axis=-1)  # [B, kmax]
  ok = w_in & (above < budget[:, None])
  t_p_win = jnp.min(jnp.where(ok, vals, jnp.inf), axis=-1)
  mass_above = lambda t: jnp.sum(jnp.where((x[:, None, :] > t[:, :, None]) & in_k[:, None, :], e[:, None, :], 0.0),  # noqa: E731
                                 axis=-1)
  t_p_far = search_if(p_on & ~in_window, lambda t: mass_above(t) < budget[:, None])
  t_p = jnp.where(p_on, jnp.where(in_window, t_p_win, t_p_far), neg_inf)
  return x >= jnp.maximum(t_k, t_p)[:, None]


def resolve_branch_free(rt, backend: str | None = None) -> bool:
  """Whether the steps of RuntimeConfig `rt` sample branch-free: sampler "branch-free", or "auto"
  with the pipelined loop on a GPU, where the branches make the host wait (backend: default
  jax.default_backend())."""
  backend = backend or jax.default_backend()
  return rt.sampler == "branch-free" or (rt.sampler == "auto" and rt.pipeline and backend == "gpu")


def resolved_sampler(rt, backend: str | None = None) -> str:
  """The sampler the steps of RuntimeConfig `rt` compile: "window", "branch-free"
  (`resolve_branch_free`) or "branch"."""
  return "window" if rt.sampler == "window" else "branch-free" if resolve_branch_free(rt, backend) else "branch"


def step_sampling(rt) -> dict:
  """`sample`'s static keyword arguments in the steps of RuntimeConfig `rt`."""
  name = resolved_sampler(rt)
  return dict(greedy_only=rt.greedy_only, branch_free=name == "branch-free", window=name == "window")


def sample(logits, temperature, top_k, top_p, seeds, counters, greedy_only: bool = False,
           branch_free: bool = False, ways: int | None = None, window: bool = False):
  """Per-row sampling. logits: [B, V] f32; temperature/top_p: [B] f32; top_k/seeds/counters: [B] int32.

  temperature 0 is greedy (argmax of the logits). Otherwise the token is drawn by Gumbel-max in
  vocabulary order over the kept set of x = logits / temperature (`kept_mask`: top-k and top-p by
  value thresholds, ties at a threshold kept), i.e. `jax.random.categorical(key, where(kept, x,
  -inf))`. The key of a row is fold_in(key(seed), counter) with counter = the position of the token
  being sampled, so a request samples the same tokens whatever its batch, slot or preemption
  history. No sort over the vocabulary: see the module docstring. A row whose logits hold NaN or
  +inf (damaged weights, an overflow) samples NON_FINITE instead of a token: the engine ends that
  request with finish_reason "error"; the flag travels in the tokens the step returns anyway, so it
  costs no output and no sync.

  greedy_only (static): every row takes the argmax, with no branch in the graph (the caller has
  refused temperature > 0; RuntimeConfig.greedy_only).
  branch_free (static): the same tokens with no branch in the graph: the stochastic path always
  runs (RuntimeConfig.sampler "branch-free"; module docstring).
  ways (static): the threshold searches' ways (`kept_mask`); the same tokens for every choice.
  window (static): window sampling (module docstring; RuntimeConfig.sampler "window"), no branch.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def stochastic():
    x = logits / jnp.maximum(temperature, 1e-6)[:, None]  # [B, V]
    masked = jnp.where(kept_mask(x, top_k, top_p, branch_free=branch_free, ways=ways, window=window), x, -jnp.inf)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s.astype(jnp.uint32)), c))(seeds, counters)
    picked = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
    return jnp.where(temperature > 0, picked, greedy)

  if greedy_only:
    tokens = greedy
  elif branch_free or window:
    tokens = stochastic()
  else:
    tokens = jax.lax.cond(jnp.any(temperature > 0), stochastic, lambda: greedy)
  return jnp.where(jnp.all(logits < jnp.inf, axis=-1), tokens, NON_FINITE)  # NaN < inf is False; -inf masks pass
