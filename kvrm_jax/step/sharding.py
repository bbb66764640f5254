"""Mesh code, apart from the model: the `tp` axis, PartitionSpecs, and shard_map wrappers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvrm_jax.model import llama as model_lib

AXIS = "tp"


class ShardingError(ValueError):
  """A mesh request this machine cannot serve (a user error)."""


def make_mesh(tp="1") -> Mesh:
  """A 1-D mesh over the first `tp` devices ("all" = every device; with jax.distributed
  initialized these span every process, each contributing its local devices)."""
  devices = jax.devices()
  if str(tp) == "all":
    n = len(devices)
  else:
    try:
      n = int(tp)
    except ValueError:
      raise ShardingError(f"--tp must be a positive integer or 'all', got {tp!r}") from None
  if n < 1:
    raise ShardingError(f"--tp must be >= 1, got {n}")
  if n > len(devices):
    raise ShardingError(f"--tp {n} needs {n} devices but only {len(devices)} {jax.default_backend()} device(s) "
                        "are present (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N)")
  return Mesh(np.array(devices[:n]), (AXIS,))


# Megatron-style tensor parallelism over `tp`: q/k/v and MLP gate/up column-sharded (by heads /
# features), o-proj and down-proj row-sharded (the model psums their outputs), norms, embeddings
# and the LM head replicated (logits are needed whole on every device for sampling). The model's
# fused wqkv / w_gate_up keep whole kv groups / features together, so they column-shard too; the
# checkpoint's separate matrices (restored straight onto the mesh) have specs of their own.
COL = P(None, None, AXIS)
ROW = P(None, AXIS, None)
PARAM_SPECS = {
    "embed": P(), "attn_norm": P(), "mlp_norm": P(), "final_norm": P(), "lm_head": P(),
    "wqkv": COL, "w_gate_up": COL, "wo": ROW, "w_down": ROW,
}
CHECKPOINT_SPECS = {**{k: v for k, v in PARAM_SPECS.items() if k not in ("wqkv", "w_gate_up")},
                    "wq": COL, "wk": COL, "wv": COL, "w_gate": COL, "w_up": COL}
POOL_SPEC = P(AXIS)  # [K, L, N, bs, E]: sharded over KV heads
HOST_POOL_SPEC = P(None, None, AXIS)  # host tier [L, NH, K, bs, E]: sharded over KV heads
REPLICATED = P()


def param_spec(name: str) -> P:
  return PARAM_SPECS[name]


def named_shardings(mesh: Mesh) -> dict:
  """{checkpoint name: NamedSharding}, for restoring checkpoints straight onto the mesh."""
  return {k: NamedSharding(mesh, v) for k, v in CHECKPOINT_SPECS.items()}


def state_specs(state):
  """PartitionSpecs with the structure of an nnx.State of model.Llama."""
  return jax.tree_util.tree_map_with_path(lambda path, _: param_spec(path[0].key), state)


def place_state(state, mesh: Mesh):
  specs = state_specs(state)
  return jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))


def padded_config(cfg, tp: int):
  """Head/feature padding policy for a mesh that does not divide the model.

  KV heads are padded up to a multiple of tp with inert zero heads (their q heads too, keeping
  the GQA group size), and the MLP width up to a multiple of tp with zero features. Zero k/v
  heads and zero o-proj rows contribute exactly 0, so outputs are unchanged; the cost is the
  padded heads' KV memory and compute (SmolLM2 at tp=2: 3 -> 4 KV heads, +33%). vLLM refuses
  such models instead.
  """
  k = -(-cfg.num_kv_heads // tp) * tp
  f = -(-cfg.intermediate_size // tp) * tp
  if (k, f) == (cfg.num_kv_heads, cfg.intermediate_size):
    return cfg
  return dataclasses.replace(cfg, num_kv_heads=k, num_heads=k * cfg.q_per_kv, intermediate_size=f)


def pad_weights(cfg, new_cfg, w: dict):
  """Zero-pad the model's {name: array} weights (fused layout) from cfg's head/feature counts to new_cfg's."""
  if new_cfg == cfg:
    return dict(w)
  dk, df = new_cfg.num_kv_heads - cfg.num_kv_heads, new_cfg.intermediate_size - cfg.intermediate_size
  g, e, L, d = cfg.q_per_kv, cfg.head_dim, cfg.num_layers, cfg.hidden_size
  kh = cfg.num_kv_heads
  out = dict(w)
  out["wqkv"] = jnp.pad(w["wqkv"].reshape(L, d, kh, g + 2, e),
                        ((0, 0), (0, 0), (0, dk), (0, 0), (0, 0))).reshape(L, d, -1)
  out["wo"] = jnp.pad(w["wo"].reshape(L, kh, g, e, d), ((0, 0), (0, dk), (0, 0), (0, 0), (0, 0))).reshape(L, -1, d)
  out["w_gate_up"] = jnp.pad(w["w_gate_up"].reshape(L, d, -1, 2), ((0, 0), (0, 0), (0, df), (0, 0))).reshape(L, d, -1)
  out["w_down"] = jnp.pad(w["w_down"], ((0, 0), (0, df), (0, 0)))
  return out


def shard_step(fn, mesh: Mesh, state_spec_tree, n_extra_out: int = 0, n_host: int = 0, n_feed: int = 0):
  """Wrap a step fn(state, k_pool, v_pool, ints, floats, *host_pools, *fed_tokens) -> (tokens, k_pool,
  v_pool, *extra); fed tokens (the pipelined loop's previous step's tokens) are replicated."""
  out_specs = (REPLICATED, POOL_SPEC, POOL_SPEC) + (REPLICATED,) * n_extra_out
  in_specs = ((state_spec_tree, POOL_SPEC, POOL_SPEC, REPLICATED, REPLICATED) + (HOST_POOL_SPEC,) * n_host
              + (REPLICATED,) * n_feed)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def shard_swap(fn, mesh: Mesh):
  """Wrap the host tier's swap op fn(k_pool, v_pool, k_host, v_host, ints) -> the four pools."""
  pools = (POOL_SPEC, POOL_SPEC, HOST_POOL_SPEC, HOST_POOL_SPEC)
  return jax.shard_map(fn, mesh=mesh, in_specs=pools + (REPLICATED,), out_specs=pools, check_vma=False)


def place_model(cfg, graphdef, state, mesh: Mesh):
  """A model's (cfg, graphdef, state, state specs) on the mesh: heads that do not divide the mesh
  are padded with inert zero heads first (`padded_config`), then every parameter is placed."""
  padded = padded_config(cfg, mesh.size)
  if padded != cfg:
    w = pad_weights(cfg, padded, nnx.to_pure_dict(state))
    graphdef, state = model_lib.split(model_lib.abstract_model(padded, w["wqkv"].dtype))
    nnx.replace_by_pure_dict(state, w)
    cfg = padded
  return cfg, graphdef, place_state(state, mesh), state_specs(state)
