"""Requests, their sampling parameters and outputs (host-side state only)."""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Per-request generation settings. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

  max_new_tokens: int = 32
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple[str, ...] = ()
  ignore_eos: bool = False

  def __post_init__(self):
    for f in ("max_new_tokens", "top_k", "seed"):  # bool is an int subclass; floats would truncate
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{f} must be an integer, got {v!r}")
    for f in ("temperature", "top_p"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{f} must be a finite number, got {v!r}")
    if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
      raise ValueError(f"stop must be a tuple of strings, got {self.stop!r}")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if not 0 <= self.seed < 2**31:
      raise ValueError(f"seed must be in [0, 2**31), got {self.seed}")


NON_FINITE = -1  # the token id the decode step samples from a row of non-finite logits (ends the request)
FEED_TOKEN = -2  # a slot's next input is the output of the step in flight, on the device (pipelined loop)


class Status(enum.Enum):
  WAITING = "waiting"
  PREFILL = "prefill"
  RUNNING = "running"
  FINISHED = "finished"
  REJECTED = "rejected"


@dataclasses.dataclass(eq=False)
class Request:
  """One request's host state. KV of `all_ids[:num_computed]` is in the pool."""

  id: int
  prompt_ids: list[int]
  sampling: SamplingParams
  arrival: float = 0.0
  output_ids: list[int] = dataclasses.field(default_factory=list)
  status: Status = Status.WAITING
  finish_reason: str | None = None
  slot: int | None = None  # its decode slot; while it has one, kvrm_jax/sched/slots.py owns its KV state
  forced: list[int] | None = None  # teacher-forced output tokens
  summaries: object = None  # SummaryConfig of this request (None: the engine's)
  # Prefill target: tokens whose KV the prefill must compute. A fresh request computes its whole
  # prompt and samples its first token; a resumed (preempted) one recomputes all but its pending
  # last token and keeps the tokens it already generated.
  prefill_target: int = 0
  preemptions: int = 0
  first_token_time: float | None = None
  token_times: list[float] = dataclasses.field(default_factory=list)
  finish_time: float | None = None
  admitted_time: float | None = None
  # Host tier (kvrm_jax/sched/tier.py): whether its KV is swapped out, whether its table ever left
  # logical order (no prefix hashes).
  swapped: bool = False
  tiered: bool = False
  mass: object = None  # [blocks] accumulated attention mass per table block (attention policy)
  _computed: int = dataclasses.field(default=0, repr=False)  # num_computed while out of a slot
  _slots: object = dataclasses.field(default=None, repr=False)  # the Slots that hold it

  @property
  def num_computed(self) -> int:
    """Tokens whose KV is computed (in the pool, or swapped out with it)."""
    return int(self._slots.pos[self.slot]) if self.slot is not None else self._computed

  @num_computed.setter
  def num_computed(self, n: int) -> None:
    if self.slot is not None:
      self._slots.pos[self.slot] = n
    else:
      self._computed = n

  @property
  def all_ids(self) -> list[int]:
    return self.prompt_ids + self.output_ids

  @property
  def num_tokens(self) -> int:
    return len(self.prompt_ids) + len(self.output_ids)

  @property
  def done(self) -> bool:
    return self.status in (Status.FINISHED, Status.REJECTED)


@dataclasses.dataclass
class RequestOutput:
  """What the engine reports for a request: its tokens so far and, once done, why it ended."""

  id: int
  prompt_ids: list[int]
  output_ids: list[int]
  new_ids: list[int]
  finished: bool
  finish_reason: str | None
  text: str | None = None


class RequestError(ValueError):
  """A request that can never be served (a user error: empty, too long, ...). `param`: the request
  field at fault where one is (the server's 400 names it)."""

  def __init__(self, message: str, param: str | None = None):
    super().__init__(message)
    self.param = param
