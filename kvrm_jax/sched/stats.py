"""Engine statistics: counters and per-step series, and the summary of scripts/decode.py's JSON."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class EngineStats:
  """Cumulative counters and per-step series of one engine (benchmarks slice them per run)."""

  decode_steps: int = 0  # steps with decode rows (mixed steps included)
  prefill_steps: int = 0  # steps with prompt work (mixed steps included)
  mixed_steps: int = 0  # one-call steps of decode rows and prompt tiles (RuntimeConfig.step_tokens)
  pipelined_steps: int = 0  # decode steps dispatched before the previous step's tokens were read
  preemptions: int = 0  # recompute and swap
  prefix_hit_blocks: int = 0  # prompt blocks found in the prefix cache
  moves: int = 0  # block copies (copy-on-write + compaction)
  slot_moves: int = 0  # requests moved to lower slots (RuntimeConfig.decode_buckets)
  folds: int = 0  # blocks folded into summary rows
  peak_reserved_blocks: int = 0  # blocks held by admitted sequences
  peak_live_tokens: int = 0  # tokens actually in the cache
  # Prompt tokens the steps computed, and the positions the steps gave prompt work, padding included
  # (a prefill call's rows x chunk, a mixed step's tiles x tile): what the buckets cost in compute.
  prompt_tokens: int = 0
  prompt_positions: int = 0
  # Per decode step: mean runs per decoding sequence, host µs (schedule + descriptors), device
  # seconds of the step, reserved blocks and live tokens.
  groups_per_seq: list[float] = dataclasses.field(default_factory=list)
  host_us: list[float] = dataclasses.field(default_factory=list)
  step_s: list[float] = dataclasses.field(default_factory=list)
  reserved_series: list[int] = dataclasses.field(default_factory=list)
  decode_rows: list[int] = dataclasses.field(default_factory=list)  # rows of each decode-only step
  live_series: list[int] = dataclasses.field(default_factory=list)
  # Host tier: blocks placed on the host, swap preemptions, extents copied out / in, and per decode
  # step (extents swapped out, in, staged by the step per layer; host blocks in use).
  placed_blocks: int = 0
  swap_preemptions: int = 0
  swap_out_extents: int = 0
  swap_in_extents: int = 0
  tier_series: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)
  # Start-up: Engine() seconds; seconds spent lowering and compiling the steps' executables; first
  # step() call to first token (compiles included).
  build_s: float = 0.0
  compile_s: float = 0.0
  first_token_s: float | None = None
  _t_first_step: float | None = None

  SERIES = ("groups_per_seq", "host_us", "step_s", "reserved_series", "decode_rows", "live_series", "tier_series")

  def take_series(self) -> dict[str, list]:
    """The per-step series recorded since the last call, emptied here: a server that never ends
    would otherwise keep an entry per step of each for ever (the counters and peaks stay)."""
    out = {f: getattr(self, f) for f in self.SERIES}
    for f in self.SERIES:
      setattr(self, f, [])
    return out


def summary(st: EngineStats, *, kind: str, compiles, rt, cfg, itemsize: int, generated: int,
            tier_policy: str | None, sampler: str) -> dict:
  """The stats object of scripts/decode.py's JSON (the host tier's part only when it exists)."""
  block_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * rt.block_size * cfg.head_dim * itemsize
  token_bytes = block_bytes // rt.block_size
  return {
      "engine": kind,
      "greedy_only_steps": rt.greedy_only,
      "sampler": sampler,  # "branch" | "branch-free" | "window" (RuntimeConfig.sampler resolved)
      "decode_compiles": compiles.decode,
      "prefill_compiles": compiles.prefill,
      "mixed_compiles": compiles.mixed,
      "steps": st.decode_steps,
      "prefill_steps": st.prefill_steps,
      "mixed_steps": st.mixed_steps,
      "pipelined_steps": st.pipelined_steps,
      "reserved_kv_bytes": st.peak_reserved_blocks * block_bytes,
      "live_kv_bytes": st.peak_live_tokens * token_bytes,
      "pool_kv_bytes": (rt.num_blocks - 1) * block_bytes,
      "preemptions": st.preemptions,
      "prefix_hit_blocks": st.prefix_hit_blocks,
      "prompt_tokens": st.prompt_tokens, "prompt_positions": st.prompt_positions,
      "mean_groups_per_seq": float(np.mean(st.groups_per_seq)) if st.groups_per_seq else 0.0,
      "block_moves": st.moves,
      "slot_moves": st.slot_moves,
      "mean_decode_rows": float(np.mean(st.decode_rows)) if st.decode_rows else 0.0,
      "host_us_per_step": float(np.median(st.host_us)) if st.host_us else 0.0,
      "generated_tokens": generated,
      "startup_s": {"engine_build": st.build_s, "compile": st.compile_s, "first_token": st.first_token_s},
      **({} if tier_policy is None else {
          "tier_policy": tier_policy, "host_pool_kv_bytes": (rt.host_extents - 1) * rt.host_extent * block_bytes,
          "placed_blocks": st.placed_blocks, "swap_preemptions": st.swap_preemptions,
          "swap_out_extents": st.swap_out_extents, "swap_in_extents": st.swap_in_extents,
          "peak_host_blocks": max((t[3] for t in st.tier_series), default=0)}),
  }
