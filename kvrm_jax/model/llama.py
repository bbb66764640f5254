"""Llama-family decoder (SmolLM2, Llama 2/3) in Flax NNX, written for local shapes.

The model knows nothing about how KV is stored: each layer hands its new q/k/v to an `attend`
callback (paged KV-RM pool, or the static baseline's dense cache) that writes the new KV and
returns the attention output. Layers run under `lax.scan` over stacked weights, or (unroll=True)
as a Python loop over static per-layer slices of them.

Legend for shape comments: T tokens, D model width, H q heads, K kv heads, G q heads per kv head,
E head dim, F MLP width, V vocab, L layers.

Projections that read the same input are stored fused, so a decode step runs one GEMM for q/k/v
and one for gate/up per layer (fewer, larger kernels: docs/step.md). Checkpoints keep the usual
separate matrices (CHECKPOINT_LAYER_PARAMS); `fuse_weights` / `unfuse_weights` convert between the two.
  wqkv       [L, D, K * (G + 2) * E]  per kv head j: its G q heads, then k_j, then v_j
  w_gate_up  [L, D, F * 2]            per feature f: gate_f, up_f (interleaved)
Both layouts keep whole kv groups / features together, so sharding the last axis over `tp`
(column parallelism) gives each device whole heads and features of its own.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvrm_jax.config import ModelConfig

# attend(layer, q [T, H, E], k [T, K, E], v [T, K, E], cache) -> (out [T, H, E], cache)
AttendFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, object], tuple[jax.Array, object]]

LAYER_PARAMS = ("attn_norm", "wqkv", "wo", "mlp_norm", "w_gate_up", "w_down")
# The separate matrices of checkpoints (orbax folders, GGUF, Hugging Face), [in, out] each.
CHECKPOINT_LAYER_PARAMS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


def _xp(x):
  return jnp if isinstance(x, jax.Array) else np


def fuse_weights(cfg: ModelConfig, w: dict) -> dict:
  """{checkpoint name: array} -> {model name: array}: q/k/v into `wqkv`, gate/up into `w_gate_up`.

  numpy in, numpy out; jax arrays in, jax arrays out. Other entries pass through."""
  xp = _xp(w["wq"])
  L, d = w["wq"].shape[:2]
  k, g, e = w["wk"].shape[-1] // cfg.head_dim, cfg.q_per_kv, cfg.head_dim
  out = {n: a for n, a in w.items() if n not in ("wq", "wk", "wv", "w_gate", "w_up")}
  q = w["wq"].reshape(L, d, k, g, e)
  kv = [w[n].reshape(L, d, k, 1, e) for n in ("wk", "wv")]
  out["wqkv"] = xp.concatenate([q] + kv, axis=3).reshape(L, d, k * (g + 2) * e)
  out["w_gate_up"] = xp.stack([w["w_gate"], w["w_up"]], axis=-1).reshape(L, d, -1)
  return out


def unfuse_weights(cfg: ModelConfig, w: dict) -> dict:
  """Inverse of `fuse_weights` (for saving a model as a checkpoint)."""
  L, d, n = w["wqkv"].shape
  g, e = cfg.q_per_kv, cfg.head_dim
  k = n // ((g + 2) * e)
  out = {n_: a for n_, a in w.items() if n_ not in ("wqkv", "w_gate_up")}
  qkv = w["wqkv"].reshape(L, d, k, g + 2, e)
  out["wq"] = qkv[:, :, :, :g].reshape(L, d, k * g * e)
  out["wk"] = qkv[:, :, :, g].reshape(L, d, k * e)
  out["wv"] = qkv[:, :, :, g + 1].reshape(L, d, k * e)
  gu = w["w_gate_up"].reshape(L, d, -1, 2)
  out["w_gate"], out["w_up"] = gu[..., 0], gu[..., 1]
  return out


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Shapes of a checkpoint's separate matrices for this config."""
  d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  qd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  shapes = {"embed": (cfg.vocab_size, d), "attn_norm": (L, d), "wq": (L, d, qd), "wk": (L, d, kd),
            "wv": (L, d, kd), "wo": (L, qd, d), "mlp_norm": (L, d), "w_gate": (L, d, f), "w_up": (L, d, f),
            "w_down": (L, f, d), "final_norm": (d,)}
  if not cfg.tie_embeddings:
    shapes["lm_head"] = (d, cfg.vocab_size)
  return shapes


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


def matmul_precision(dtype):
  """The matmul precision a model of `dtype` computes under (a context manager, applied at trace time).

  float32 means IEEE float32 matmuls on every backend: XLA's and Pallas Triton's default on Ampere
  and later GPUs is TF32 (10-bit mantissa), which moves logits by ~1e-3 relative and flips greedy
  near-ties between GPU runs (tp=2 against tp=1, GPU against CPU). bf16 models keep the backend's
  default, and so does a process that chose its own `jax_default_matmul_precision` (e.g. the
  environment's JAX_DEFAULT_MATMUL_PRECISION=tensorfloat32 buys TF32 speed back).
  """
  if jnp.dtype(dtype) == jnp.float32 and jax.config.jax_default_matmul_precision is None:
    return jax.default_matmul_precision("highest")
  return contextlib.nullcontext()


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
    self.wqkv = init((L, d, qd + 2 * kd), d)  # [L, D, K*(G+2)*E]
    self.wo = init((L, qd, d), qd)  # [L, H*E, D]
    self.mlp_norm = nnx.Param(jnp.ones((L, d), dtype))  # [L, D]
    self.w_gate_up = init((L, d, 2 * f), d)  # [L, D, F*2]
    self.w_down = init((L, f, d), f)  # [L, F, D]
    self.final_norm = nnx.Param(jnp.ones((d,), dtype))  # [D]
    self.lm_head = None if cfg.tie_embeddings else init((d, cfg.vocab_size), d)  # [D, V]

  def layer_weights(self) -> dict[str, jax.Array]:
    return {n: getattr(self, n)[...] for n in LAYER_PARAMS}

  def __call__(self, tokens, positions, cache, attend: AttendFn, *, logits_index=None, reduce=None,
               unroll: bool = False, matmul=None):
    """tokens, positions: [T] int32. Returns (logits [T or len(logits_index), V] f32, cache).

    Written for local shapes: under tensor parallelism the weights are this device's shards
    (head counts come from their shapes) and `reduce` sums the row-parallel projections.
    unroll: a Python loop over layers with static weight slices `w[i]` and a static layer index
    passed to `attend`, instead of `lax.scan` (same math; the compiled graph is L layers long).
    matmul: (x [T, K], w [K, N], out_dtype) -> [T, N] for the projections and the LM head
    (kvrm_jax/step/gemm.py); default x @ w.
    """
    with matmul_precision(self.embed[...].dtype):  # everything the layers call (attend too) is traced inside
      return self._forward(tokens, positions, cache, attend, logits_index, reduce, unroll, matmul or dot)

  def _forward(self, tokens, positions, cache, attend, logits_index, reduce, unroll, mm):
    cfg = self.cfg
    t = tokens.shape[0]
    reduce = reduce or (lambda y: y)
    e = cfg.head_dim
    g = cfg.q_per_kv
    nkv = self.wqkv.shape[-1] // ((g + 2) * e)
    x = self.embed[...][tokens]  # [T, D]
    inv_freq = rope_inv_freq(cfg)

    def layer(carry, w):
      x, cache, li = carry
      h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
      qkv = mm(h, w["wqkv"]).reshape(t, nkv, g + 2, e)
      q = qkv[:, :, :g].reshape(t, nkv * g, e)  # q head j*G + i reads kv head j
      k, v = qkv[:, :, g], qkv[:, :, g + 1]
      q = apply_rope(q, positions, inv_freq)
      k = apply_rope(k, positions, inv_freq)
      o, cache = attend(li, q, k, v, cache)  # [T, H, E]
      x = x + reduce(mm(o.reshape(t, -1).astype(x.dtype), w["wo"]))
      h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
      gu = mm(h, w["w_gate_up"]).reshape(t, -1, 2)
      x = x + reduce(mm(jax.nn.silu(gu[..., 0]) * gu[..., 1], w["w_down"]))
      return (x, cache, li + 1), None

    ws = self.layer_weights()  # {name: [L, ...]}
    if unroll:
      for i in range(ws["wqkv"].shape[0]):
        (x, cache, _), _ = layer((x, cache, i), {n: w[i] for n, w in ws.items()})
    else:
      (x, cache, _), _ = jax.lax.scan(layer, (x, cache, jnp.int32(0)), ws)
    if logits_index is not None:
      x = x[logits_index]
    x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
    if self.lm_head is None:  # tied: the embedding's transpose, read in place by XLA's dot
      logits = jnp.dot(x, self.embed[...].T, preferred_element_type=jnp.float32)
    else:
      logits = mm(x, self.lm_head[...], jnp.float32)
    return logits, cache


def dot(x, w, out_dtype=None):
  """XLA's dot, accumulated (and returned) in out_dtype when given: the model's default `matmul`."""
  return jnp.dot(x, w, preferred_element_type=out_dtype)


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


def random_model(cfg: ModelConfig, dtype=jnp.float32, seed: int = 0) -> Llama:
  """`Llama(cfg, dtype=dtype, rngs=nnx.Rngs(seed))` drawn in one compiled call: one executable (one
  persistent-cache entry) instead of eager ops per weight, and no float32 copy of a weight on the
  device beside its `dtype` one (XLA fuses the draw, the scale and the cast). The same weights in
  bfloat16; in float32 within one rounding of the eager ones (the fused scale)."""
  graphdef, _ = nnx.split(abstract_model(cfg, jnp.dtype(dtype)))  # the structure: no seed in it
  state = jax.jit(lambda: nnx.state(Llama(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed))))()
  return nnx.merge(graphdef, state)


def from_weights(cfg: ModelConfig, weights: dict, dtype=jnp.float32) -> Llama:
  """A model from {checkpoint name: array} (separate q/k/v and gate/up matrices), cast to dtype."""
  graphdef, state = nnx.split(abstract_model(cfg, jnp.dtype(dtype)))
  fused = fuse_weights(cfg, {k: jnp.asarray(v).astype(dtype) for k, v in weights.items()})
  nnx.replace_by_pure_dict(state, fused)
  return nnx.merge(graphdef, state)


def checkpoint_weights(model: Llama) -> dict:
  """{checkpoint name: array} of a model (the inverse of `from_weights`)."""
  return unfuse_weights(model.cfg, nnx.to_pure_dict(nnx.state(model)))
