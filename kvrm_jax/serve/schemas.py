"""Request and response bodies of the OpenAI API subset we serve (pydantic models).

Unknown fields are rejected (400) rather than silently ignored; known OpenAI fields we do not
implement are accepted only at their neutral values (`unsupported` in app.py says which).
Extensions (as in vLLM): `top_k` (0 or -1 = off) and `ignore_eos`.
"""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
  include_usage: bool = False


class _Sampling(_Strict):
  """Fields shared by both endpoints."""

  model: str
  max_tokens: int | None = Field(None, ge=1)
  temperature: float | None = Field(None, ge=0, le=2)
  top_p: float | None = Field(None, gt=0, le=1)
  top_k: int | None = Field(None, ge=-1)
  seed: int | None = Field(None, ge=0, lt=2**31)
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  n: int = Field(1, ge=1)
  ignore_eos: bool = False
  user: str | None = None
  presence_penalty: float | None = None
  frequency_penalty: float | None = None
  logit_bias: dict[str, float] | None = None

  def stop_strings(self) -> tuple[str, ...]:
    if self.stop is None:
      return ()
    return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
  prompt: str | list[int] | list[str] | list[list[int]]
  logprobs: int | None = None
  echo: bool = False
  best_of: int | None = None
  suffix: str | None = None


class ContentPart(_Strict):
  type: str
  text: str | None = None


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra="allow")  # e.g. tool_calls or name: the template decides what it uses

  role: Literal["system", "developer", "user", "assistant", "tool"]
  content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Sampling):
  messages: list[ChatMessage]
  max_completion_tokens: int | None = Field(None, ge=1)
  logprobs: bool | None = None
  top_logprobs: int | None = None
  tools: list[dict] | None = None
  tool_choice: str | dict | None = None
  response_format: dict | None = None


# ---------------------------------------------------------------------------- responses


class Usage(BaseModel):
  prompt_tokens: int
  completion_tokens: int
  total_tokens: int


class _Choice(BaseModel):
  index: int = 0
  finish_reason: str | None = None
  logprobs: None = None


class CompletionChoice(_Choice):
  text: str


class AssistantMessage(BaseModel):
  role: Literal["assistant"] = "assistant"
  content: str


class ChatChoice(_Choice):
  message: AssistantMessage


class Delta(BaseModel):
  role: Literal["assistant"] | None = None
  content: str | None = None


class ChatChunkChoice(_Choice):
  delta: Delta


C = TypeVar("C", bound=_Choice)


class _Response(BaseModel, Generic[C]):
  id: str
  created: int
  model: str
  choices: list[C]
  usage: Usage | None = None


class CompletionResponse(_Response[CompletionChoice]):
  """A completion, and each streamed chunk of one."""

  object: Literal["text_completion"] = "text_completion"


class ChatCompletionResponse(_Response[ChatChoice]):
  object: Literal["chat.completion"] = "chat.completion"
  usage: Usage


class ChatCompletionChunk(_Response[ChatChunkChoice]):
  object: Literal["chat.completion.chunk"] = "chat.completion.chunk"


class ModelCard(BaseModel):
  id: str
  object: Literal["model"] = "model"
  created: int
  owned_by: str = "kvrm-jax"
  max_model_len: int  # extension (as vLLM): prompt + output tokens of one request
  vocab_size: int  # extension: prompts given as token ids must be below it


class ModelList(BaseModel):
  object: Literal["list"] = "list"
  data: list[ModelCard]


class ErrorBody(BaseModel):
  message: str
  type: str
  param: str | None = None
  code: str | None = None


class ErrorResponse(BaseModel):
  error: ErrorBody
