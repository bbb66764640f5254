"""A plain dense decode loop with no cache and no pager: the independent in-repo reference the
engines are tested against (greedy, one prompt at a time, full recompute each token)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvrm_jax.model import llama as model_lib


def _causal_attend(layer, q, k, v, cache):
  t = q.shape[0]
  mask = jnp.tril(jnp.ones((t, t), bool))[None]
  return model_lib.attention(q[None], k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None], mask)[0], cache


def forward_logits(model: model_lib.Llama, ids) -> np.ndarray:
  """Logits [T, V] of a whole sequence (causal), no KV cache."""
  graphdef, state = model_lib.split(model)
  return np.asarray(_forward(graphdef, state, jnp.asarray(ids, jnp.int32)))


@jax.jit(static_argnums=0)
def _forward(graphdef, state, ids):
  m = model_lib.merge(graphdef, state)
  logits, _ = m(ids, jnp.arange(ids.shape[0], dtype=jnp.int32), None, _causal_attend)
  return logits


def greedy_generate(model: model_lib.Llama, prompt_ids, max_new_tokens: int, eos_ids=()) -> list[int]:
  """Greedy continuation of one prompt; stops after an EOS (included). Each step runs the whole
  sequence padded at its end to a power of two (causal: the padding changes no earlier row), so
  a generation compiles a few lengths instead of one per token."""
  graphdef, state = model_lib.split(model)
  ids = list(prompt_ids)
  out = []
  for _ in range(max_new_tokens):
    n = len(ids)
    padded = np.zeros(max(16, 1 << (n - 1).bit_length()), np.int32)
    padded[:n] = ids
    logits = _forward(graphdef, state, jnp.asarray(padded))
    tok = int(jnp.argmax(logits[n - 1]))
    out.append(tok)
    ids.append(tok)
    if tok in eos_ids:
      break
  return out
