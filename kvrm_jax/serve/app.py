"""The FastAPI application: OpenAI-compatible completions and chat completions on the engine loop.

Every error is an OpenAI-style JSON body `{"error": {"message", "type", "param", "code"}}`: bad
input 400 (FastAPI's 422 validation answers included), a full queue 429 with Retry-After, a
draining or dead engine 503; never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvrm_jax.serve import schemas as S
from kvrm_jax.serve.detok import TextStream, full_text
from kvrm_jax.serve.engine_loop import (EngineLoop, EngineProcess, Handle, Overloaded, RequestError, SamplingParams,
                                        check_sampling)
from kvrm_jax.serve.metrics import CONTENT_TYPE, Metrics

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


class APIError(Exception):
  """An error answered as OpenAI's JSON error body."""

  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
               type_: str = "invalid_request_error", headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.type, self.headers = status, message, param, code, type_, headers


def error_response(e: APIError) -> JSONResponse:
  body = S.ErrorResponse(error=S.ErrorBody(message=e.message, type=e.type, param=e.param, code=e.code))
  return JSONResponse(body.model_dump(), status_code=e.status, headers=e.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
  errs = exc.errors()
  for e in errs:
    if e.get("type") == "json_invalid":
      return f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", None
  parts, params = [], []
  for e in errs[:3]:
    param = ".".join(str(x) for x in e.get("loc", ())[1:])
    params.append(param)
    parts.append(f"{param or 'body'}: {e.get('msg')}" + (f" (got {e['input']!r})" if param and "input" in e else ""))
  more = f" (and {len(errs) - 3} more)" if len(errs) > 3 else ""
  return "; ".join(parts) + more, params[0] if params else None


def _sse(model) -> str:
  return f"data: {model.model_dump_json()}\n\n"


_MARK = "\x00text\x00"


class _ChunkTemplate:
  """A streaming chunk rendered once by its pydantic model; each token event then costs one
  json.dumps of its text (a chunk per token event of every stream adds up under load)."""

  def __init__(self, chunk):
    head, tail = _sse(chunk(_MARK, None)).split(json.dumps(_MARK))
    self.head, self.tail, self.chunk = head, tail, chunk

  def __call__(self, text: str, reason: str | None) -> str:
    if reason is not None:
      return _sse(self.chunk(text, reason))
    return self.head + json.dumps(text, ensure_ascii=False) + self.tail


class _NoText:
  """The tokenizer of a server that has none (a `--preset` model shape without the bundled model):
  outputs carry no text, only their token counts."""

  def decode(self, ids) -> str:
    return ""


def create_app(loop: EngineLoop | EngineProcess, tokenizer, model_name: str, metrics: Metrics | None = None,
               shutdown_timeout: float = 30.0) -> FastAPI:
  """The server's app; its lifespan starts the engine loop (thread or process) and stops it
  (aborting what is left).
  tokenizer None: prompts must be token ids (text, chat messages and stop strings get a 400)."""
  created = int(time.time())
  has_text = tokenizer is not None
  tokenizer = tokenizer if has_text else _NoText()

  def need_text(what_needs: str, param: str) -> None:
    if not has_text:
      raise APIError(400, f"{what_needs} a tokenizer and this server has none (a --preset model shape without "
                     "the bundled model): send the prompt as token ids", param=param)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    loop.start()
    yield
    app.state.draining = True
    await asyncio.to_thread(loop.stop, shutdown_timeout)

  app = FastAPI(title="kvrm-jax", lifespan=lifespan)
  app.state.draining = False

  @app.exception_handler(APIError)
  async def _api_error(request, e: APIError):
    return error_response(e)

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, exc: RequestValidationError):
    message, param = _validation_message(exc)
    return error_response(APIError(400, message, param=param))

  @app.exception_handler(StarletteHTTPException)
  async def _http(request, exc: StarletteHTTPException):
    return error_response(APIError(exc.status_code, str(exc.detail), code=str(exc.status_code)))

  @app.exception_handler(Exception)
  async def _internal(request, exc: Exception):
    return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error"))

  # ---------------------------------------------------------------------- plain endpoints

  @app.get("/health")
  async def health():
    if app.state.draining:
      raise APIError(503, "the server is shutting down", type_="server_error")
    if not loop.alive:
      raise APIError(503, f"the engine loop stopped: {loop.error!r}", type_="server_error")
    return {"status": "ok"}

  @app.get("/v1/models")
  async def models():
    return S.ModelList(data=[S.ModelCard(id=model_name, created=created, max_model_len=loop.context_limit,
                                     vocab_size=loop.vocab_size)])

  @app.get("/metrics")
  async def prometheus():
    return Response(metrics.render() if metrics else b"", media_type=CONTENT_TYPE)

  # ---------------------------------------------------------------------- shared request handling

  def check_common(body: S._Sampling) -> None:
    if body.model != model_name:
      raise APIError(400, f"unknown model {body.model!r}; this server serves {model_name!r}", param="model",
                     code="model_not_found")
    if body.n != 1:
      raise APIError(400, f"n={body.n} is not supported: one choice per request (n=1)", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
      if getattr(body, name):
        raise APIError(400, f"{name} is not supported (leave it unset or 0)", param=name)
    if body.logit_bias:
      raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if any(not s for s in body.stop_strings()):
      raise APIError(400, "stop strings must not be empty", param="stop")

  def sampling(body: S._Sampling, max_tokens: int, prompt_len: int, prompt_param: str) -> SamplingParams:
    if body.stop_strings():
      need_text("stop strings need", "stop")
    limit = loop.context_limit
    if prompt_len >= limit:
      raise APIError(400, f"the prompt has {prompt_len} tokens; the context is {limit} tokens, which leaves no room "
                     "to generate", param=prompt_param, code="context_length_exceeded")
    if prompt_len + max_tokens > limit:
      raise APIError(400, f"max_tokens={max_tokens} + the prompt's {prompt_len} tokens exceeds the context of "
                     f"{limit} tokens", param="max_tokens", code="context_length_exceeded")
    rt = loop.rt  # --greedy-only: an omitted temperature is 0 (OpenAI's default 1 would be refused)
    temperature = (0.0 if rt.greedy_only else 1.0) if body.temperature is None else body.temperature
    try:
      sp = SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                          top_k=max(body.top_k or 0, 0), top_p=1.0 if body.top_p is None else body.top_p,
                          seed=random.randrange(2**31) if body.seed is None else body.seed,
                          stop=body.stop_strings(), ignore_eos=body.ignore_eos)
      check_sampling(rt, loop.vocab_size, sp)  # what this engine's compiled steps cannot honour
    except RequestError as e:
      raise APIError(400, str(e), param=e.param) from None
    except ValueError as e:
      raise APIError(400, str(e)) from None
    return sp

  async def start(ids: list[int], sp: SamplingParams) -> Handle:
    if app.state.draining:
      raise APIError(503, "the server is shutting down", type_="server_error")
    if not loop.alive:
      raise APIError(503, "the engine loop is not running", type_="server_error")
    try:
      h = loop.submit(ids, sp)
    except Overloaded as e:
      if metrics:
        metrics.rejected.labels("queue_full").inc()
      raise APIError(429, str(e), type_="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
    ev = await h.events.get()
    if ev.error is not None:  # the engine refused it (RequestError), or the engine loop is stopping
      raise APIError(400, ev.error, param=ev.param) if loop.alive else APIError(503, ev.error, type_="server_error")
    return h

  async def collect(h: Handle, request: Request) -> tuple[list[int], str]:
    """All tokens of a non-streaming request; aborts it if the client goes away."""
    ids: list[int] = []
    try:
      while True:
        try:
          ev = await asyncio.wait_for(h.events.get(), 1.0)
        except TimeoutError:
          if await request.is_disconnected():
            raise asyncio.CancelledError() from None
          continue
        ids += ev.token_ids
        if ev.finish_reason is not None:
          return ids, ev.finish_reason
    finally:
      loop.abort(h)  # a no-op once it finished

  async def stream(h: Handle, text: TextStream, chunk, first=None, usage_chunk=None):
    """Server-sent events of one request, a chunk per token event (its text may be empty while a
    character is unfinished); a client that disconnects aborts it (starlette cancels us)."""
    n = 0
    chunk = _ChunkTemplate(chunk)
    try:
      if first is not None:
        yield _sse(first)
      while True:
        ev = await h.events.get()
        n += len(ev.token_ids)
        delta = text.add(ev.token_ids)
        if ev.finish_reason is not None or text.stopped:
          delta += text.finish()
          yield chunk(delta, "stop" if text.stopped else ev.finish_reason)
          break
        yield chunk(delta, None)
      if usage_chunk is not None:
        yield _sse(usage_chunk(n))
      yield "data: [DONE]\n\n"
    finally:
      loop.abort(h)

  def usage(prompt_len: int, n: int) -> S.Usage:
    return S.Usage(prompt_tokens=prompt_len, completion_tokens=n, total_tokens=prompt_len + n)

  # ---------------------------------------------------------------------- completions

  @app.post("/v1/completions")
  async def completions(body: S.CompletionRequest, request: Request):
    check_common(body)
    if body.logprobs is not None:
      raise APIError(400, "logprobs is not supported", param="logprobs")
    if body.echo or (body.best_of or 1) != 1 or body.suffix:
      bad = "echo" if body.echo else "suffix" if body.suffix else "best_of"
      raise APIError(400, f"{bad} is not supported", param=bad)
    p = body.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
      if len(p) != 1:
        raise APIError(400, f"batched prompts ({len(p)}) are not supported: send one prompt per request",
                       param="prompt")
      p = p[0]
    if isinstance(p, str) and not p:
      raise APIError(400, "the prompt is empty", param="prompt")
    if isinstance(p, str):
      need_text("a text prompt needs", "prompt")
    ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
    if not ids:
      raise APIError(400, "the prompt is empty", param="prompt")
    max_tokens = body.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
    sp = sampling(body, max_tokens, len(ids), "prompt")
    h = await start(ids, sp)
    rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
      def chunk(text, reason):
        return S.CompletionResponse(id=rid, created=now, model=model_name,
                                    choices=[S.CompletionChoice(text=text, finish_reason=reason)])

      def usage_chunk(n):
        return S.CompletionResponse(id=rid, created=now, model=model_name, choices=[], usage=usage(len(ids), n))
      include = body.stream_options is not None and body.stream_options.include_usage
      return StreamingResponse(stream(h, TextStream(tokenizer, sp.stop), chunk,
                                      usage_chunk=usage_chunk if include else None), media_type="text/event-stream")
    out, reason = await collect(h, request)
    text, stopped = full_text(tokenizer, out, sp.stop)
    return S.CompletionResponse(id=rid, created=now, model=model_name, usage=usage(len(ids), len(out)),
                                choices=[S.CompletionChoice(text=text, finish_reason="stop" if stopped else reason)])

  # ---------------------------------------------------------------------- chat completions

  @app.post("/v1/chat/completions")
  async def chat(body: S.ChatCompletionRequest, request: Request):
    check_common(body)
    for name in ("logprobs", "top_logprobs", "tools"):
      if getattr(body, name):
        raise APIError(400, f"{name} is not supported", param=name)
    if body.response_format and body.response_format.get("type", "text") != "text":
      raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
    if not body.messages:
      raise APIError(400, "messages is empty", param="messages")
    need_text("chat messages need", "messages")
    msgs = []
    for i, m in enumerate(body.messages):
      d = m.model_dump(exclude_none=True)
      if isinstance(m.content, list):
        if any(part.type != "text" or part.text is None for part in m.content):
          raise APIError(400, f"messages[{i}]: only text content parts are supported", param=f"messages.{i}.content")
        d["content"] = "".join(part.text for part in m.content)
      msgs.append(d)
    try:
      prompt = tokenizer.apply_chat_template(msgs)
    except Exception as e:  # noqa: BLE001  (a template's raise_exception, or a malformed conversation)
      raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
    ids = tokenizer.encode(prompt)
    max_tokens = body.max_completion_tokens or body.max_tokens or max(loop.context_limit - len(ids), 1)
    sp = sampling(body, max_tokens, len(ids), "messages")
    h = await start(ids, sp)
    rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
      def chunk(text, reason):
        return S.ChatCompletionChunk(id=rid, created=now, model=model_name, choices=[S.ChatChunkChoice(
            delta=S.Delta(content=text), finish_reason=reason)])

      def usage_chunk(n):
        return S.ChatCompletionChunk(id=rid, created=now, model=model_name, choices=[], usage=usage(len(ids), n))
      first = S.ChatCompletionChunk(id=rid, created=now, model=model_name,
                                    choices=[S.ChatChunkChoice(delta=S.Delta(role="assistant", content=""))])
      include = body.stream_options is not None and body.stream_options.include_usage
      return StreamingResponse(stream(h, TextStream(tokenizer, sp.stop), chunk, first=first,
                                      usage_chunk=usage_chunk if include else None), media_type="text/event-stream")
    out, reason = await collect(h, request)
    text, stopped = full_text(tokenizer, out, sp.stop)
    return S.ChatCompletionResponse(id=rid, created=now, model=model_name, usage=usage(len(ids), len(out)),
                                    choices=[S.ChatChoice(message=S.AssistantMessage(content=text),
                                                          finish_reason="stop" if stopped else reason)])

  return app
