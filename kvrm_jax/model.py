"""Llama-family decoder (SmolLM2, Llama 2/3) in Flax NNX, written for local shapes.

The model knows nothing about how KV is stored: each layer hands its new q/k/v to an `attend`
callback (paged KV-RM pool, or the static baseline's dense cache) that writes the new KV and
returns the attention output. Layers run under `lax.scan` over stacked weights, or (unroll=True)
as a Python loop over static per-layer slices of them.

Legend for shape comments: T tokens, D model width, H q heads, K kv heads, G q heads per kv head,
E head dim, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from kvrm_jax.config import ModelConfig

# attend(layer, q [T, H, E], k [T, K, E], v [T, K, E], cache) -> (out [T, H, E], cache)
AttendFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, object], tuple[jax.Array, object]]

LAYER_PARAMS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


def rms_norm(x, w, eps):
  # x: [..., D] computed in f32 like HF, cast back to the activation dtype.
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (w.astype(jnp.float32) * xf).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies [E/2], with Llama-3 rope scaling when the config has it."""
  e = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
  sc = cfg.rope_scaling_dict
  if not sc:
    return inv
  kind = sc.get("rope_type", sc.get("type"))
  if kind != "llama3":
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: llama3)")
  factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
  old = sc["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv
  lo_wl, hi_wl = old / lo, old / hi
  scaled = jnp.where(wavelen > lo_wl, inv / factor, inv)
  smooth = (old / wavelen - lo) / (hi - lo)
  mid = (1 - smooth) * scaled / factor + smooth * scaled
  is_mid = (wavelen >= hi_wl) & (wavelen <= lo_wl)
  return jnp.where(is_mid, mid, scaled)


def apply_rope(x, positions, inv_freq):
  # x: [T, N, E]; positions: [T] int32. HF's rotate-half layout.
  ang = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, E/2]
  cos = jnp.concatenate([jnp.cos(ang)] * 2, axis=-1)[:, None, :]
  sin = jnp.concatenate([jnp.sin(ang)] * 2, axis=-1)[:, None, :]
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos + rot * sin).astype(x.dtype)


class Llama(nnx.Module):
  """Decoder weights (stacked over layers) and the forward pass over an abstract KV store."""

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    self.cfg = cfg
    rngs = rngs or nnx.Rngs(0)
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    qd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def init(shape, fan_in):
      return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype))

    self.embed = init((cfg.vocab_size, d), 1.0)  # [V, D]
    self.attn_norm = nnx.Param(jnp.ones((L, d), dtype))  # [L, D]
    self.wq = init((L, d, qd), d)  # [L, D, H*E]
    self.wk = init((L, d, kd), d)  # [L, D, K*E]
    self.wv = init((L, d, kd), d)  # [L, D, K*E]
    self.wo = init((L, qd, d), qd)  # [L, H*E, D]
    self.mlp_norm = nnx.Param(jnp.ones((L, d), dtype))  # [L, D]
    self.w_gate = init((L, d, f), d)  # [L, D, F]
    self.w_up = init((L, d, f), d)  # [L, D, F]
    self.w_down = init((L, f, d), f)  # [L, F, D]
    self.final_norm = nnx.Param(jnp.ones((d,), dtype))  # [D]
    self.lm_head = None if cfg.tie_embeddings else init((d, cfg.vocab_size), d)  # [D, V]

  def layer_weights(self) -> dict[str, jax.Array]:
    return {n: getattr(self, n)[...] for n in LAYER_PARAMS}

  def __call__(self, tokens, positions, cache, attend: AttendFn, *, logits_index=None, reduce=None,
               unroll: bool = False):
    """tokens, positions: [T] int32. Returns (logits [T or len(logits_index), V] f32, cache).

    Written for local shapes: under tensor parallelism the weights are this device's shards
    (head counts come from their shapes) and `reduce` sums the row-parallel projections.
    unroll: a Python loop over layers with static weight slices `w[i]` and a static layer index
    passed to `attend`, instead of `lax.scan` (same math; the compiled graph is L layers long).
    """
    cfg = self.cfg
    t = tokens.shape[0]
    reduce = reduce or (lambda y: y)
    e = cfg.head_dim
    nh, nkv = self.wq.shape[-1] // e, self.wk.shape[-1] // e
    x = self.embed[...][tokens]  # [T, D]
    inv_freq = rope_inv_freq(cfg)

    def layer(carry, w):
      x, cache, li = carry
      h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
      q = (h @ w["wq"]).reshape(t, nh, e)
      k = (h @ w["wk"]).reshape(t, nkv, e)
      v = (h @ w["wv"]).reshape(t, nkv, e)
      q = apply_rope(q, positions, inv_freq)
      k = apply_rope(k, positions, inv_freq)
      o, cache = attend(li, q, k, v, cache)  # [T, H, E]
      x = x + reduce(o.reshape(t, -1).astype(x.dtype) @ w["wo"])
      h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
      x = x + reduce((jax.nn.silu(h @ w["w_gate"]) * (h @ w["w_up"])) @ w["w_down"])
      return (x, cache, li + 1), None

    ws = self.layer_weights()  # {name: [L, ...]}
    if unroll:
      for i in range(ws["wq"].shape[0]):
        (x, cache, _), _ = layer((x, cache, i), {n: w[i] for n, w in ws.items()})
    else:
      (x, cache, _), _ = jax.lax.scan(layer, (x, cache, jnp.int32(0)), ws)
    if logits_index is not None:
      x = x[logits_index]
    x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
    head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
    logits = jnp.dot(x, head, preferred_element_type=jnp.float32)
    return logits, cache


def attention(q, k, v, mask, sm_scale=None, return_lse=False):
  """Masked GQA attention in f32. q: [B, S, H, E]; k, v: [B, K, Tk, E]; mask: [B, S, Tk] bool.

  Masked keys are dropped with `where` (never multiplied by 0) so NaN/garbage in unused KV memory
  cannot leak into outputs. Rows with no valid key return zeros (and lse -inf).
  return_lse: also return the log-sum-exp of the scaled scores, [B, S, H] f32.
  """
  b, s, h, e = q.shape
  kh = k.shape[1]
  g = h // kh
  scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(e)
  qg = q.reshape(b, s, kh, g, e).astype(jnp.float32)
  scores = jnp.einsum("bskge,bkte->bkgst", qg, k.astype(jnp.float32)) * scale
  m = mask[:, None, None, :, :]
  scores = jnp.where(m, scores, -jnp.inf)
  mx = jnp.max(scores, axis=-1, keepdims=True)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  p = jnp.where(m, jnp.exp(scores - mx), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  vf = jnp.where(jnp.isfinite(v), v.astype(jnp.float32), 0.0)  # garbage V rows get p=0 but 0*NaN=NaN
  o = jnp.einsum("bkgst,bkte->bskge", p / jnp.where(denom > 0, denom, 1.0), vf).reshape(b, s, h, e)
  if not return_lse:
    return o
  lse = jnp.where(denom > 0, mx + jnp.log(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)  # [B, K, G, S, 1]
  return o, lse[..., 0].transpose(0, 3, 1, 2).reshape(b, s, h)


def split(model: Llama):
  """graphdef + state: the state is an ordinary pytree argument of the jitted steps."""
  return nnx.split(model)


def merge(graphdef, state) -> Llama:
  return nnx.merge(graphdef, state)


def abstract_model(cfg: ModelConfig, dtype) -> Llama:
  """Shape-only model (no weights allocated) for restoring checkpoints."""
  return nnx.eval_shape(lambda: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
