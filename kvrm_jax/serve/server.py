"""`kvrm-serve` / scripts/serve.py: flags, engine, warm-up, then uvicorn until SIGTERM or SIGINT.

On SIGTERM the server stops admitting (new requests get 503, the listening socket closes), lets
in-flight requests finish for up to --shutdown-timeout seconds, aborts what is left, frees the
engine (its process or thread) and exits with status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
import time

from kvrm_jax.serve import spawn

# Only the standard library and kvrm_jax.serve.spawn at import: `main` starts the engine process
# before importing jax, the engine and the HTTP stack (engine_loop, app, uvicorn), so both
# processes import at once.


def parse_args(argv=None):
  from kvrm_jax.serve.engine_loop import add_runtime_args, compile_cache, preset_names
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for every interface)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--served-model-name", help="the `model` clients must send (default: the checkpoint folder's name)")
  p.add_argument("--max-len", type=int, default=None,
                 help="context of one request, prompt + output tokens (default: min(model context, 4096))")
  p.add_argument("--max-queue", type=int, default=256,
                 help="requests waiting beyond the --max-slots running ones; more get 429 with Retry-After")
  p.add_argument("--shutdown-timeout", type=float, default=30.0,
                 help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
  p.add_argument("--preset", choices=preset_names(), help="serve this model shape with random weights instead "
                 "of a checkpoint (benchmarks; prompts as token ids, the text is meaningless)")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--no-warmup", action="store_true", help="do not compile every step shape before listening")
  g.add_argument("--compile-in-background", action="store_true",
                 help="before listening compile only the steps that can run any step (the decode step over all "
                 "slots and the largest prompt bucket, at once), the others while serving; until a step's own "
                 "executable is ready it runs in a larger one (the same tokens, slower); ready sooner on a cold "
                 "start")
  p.add_argument("--log-level", default="warning", help="uvicorn log level (debug | info | warning | error)")
  p.add_argument("--engine-thread", action="store_true",
                 help="run the engine in a thread of the server's process instead of its own process (the "
                 "engine's host work then shares one interpreter lock with the HTTP streams)")
  add_runtime_args(p, max_slots_help="decode batch (default 16)",
                   num_blocks_help="KV pool blocks (default: every slot can hold --max-len tokens)")
  compile_cache.add_args(p)
  return p.parse_args(argv)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  # The engine process starts now, its imports beside ours; it waits for the parsed flags.
  early = None if {"-h", "--help", "--engine-thread"} & set(argv) else spawn.spawn()
  try:
    from kvrm_jax.serve.engine_loop import run_main
    return run_main(lambda a: serve(parse_args(a), early), argv)
  finally:
    if early is not None and not early.sent:  # the server failed before handing it the flags
      early.close()


def serve(args, spawned=None) -> int:
  """Run the server until SIGTERM / SIGINT. spawned: an engine process started before the flags
  were parsed (`main`), else one is started here (or the engine runs in a thread: --engine-thread)."""
  import uvicorn
  from kvrm_jax.serve.app import create_app
  from kvrm_jax.cli import check_runtime_args
  from kvrm_jax.serve.engine_loop import EngineLoop, EngineProcess, UserError, compile_cache
  from kvrm_jax.serve.metrics import Metrics
  if args.max_queue < 0:
    raise UserError(f"--max-queue must be >= 0, got {args.max_queue}")
  if args.shutdown_timeout < 0:
    raise UserError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
  if not 0 < args.port < 65536:
    raise UserError(f"--port must be in [1, 65535], got {args.port}")
  check_runtime_args(args)  # --engine, --dtype and the sizes: 0 is not "the default"

  if args.preset and args.checkpoint:
    raise UserError("give --checkpoint or --preset, not both")
  t0 = time.perf_counter()
  compile_cache.from_args(args)  # a second start reads its executables back (a warm-up in seconds)

  def log(line: str) -> None:
    print(f"[serve] {line}", file=sys.stderr, flush=True)

  metrics = Metrics()
  if args.engine_thread:
    engine, tok, name, dtype = build_engine(args, log)
    loop = EngineLoop(engine, max_queue=args.max_queue, metrics=metrics)
    kind = engine.kind
  else:
    loop = EngineProcess(build_engine, args, max_queue=args.max_queue, metrics=metrics, log=log, spawned=spawned)
    tok, name, dtype, kind = loop.tokenizer, loop.name, loop.dtype, loop.kind
  app = create_app(loop, tok, name, metrics=metrics, shutdown_timeout=args.shutdown_timeout)
  # Our drain ends every stream before uvicorn closes connections; its own timeout is a backstop.
  config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)

  def drain():
    app.state.draining = True
    clean = loop.drain(args.shutdown_timeout)
    print(f"[serve] shutting down: {'every request finished' if clean else 'requests left were aborted'}",
          file=sys.stderr, flush=True)

  server = _server_class(uvicorn)(config, drain)
  rt = loop.rt
  print(f"[serve] {name} ({dtype}, {kind}, {rt.max_slots} slots, {rt.num_blocks} blocks of {rt.block_size}, "
        f"context {loop.context_limit}, engine in {'a thread' if args.engine_thread else 'its own process'}) ready "
        f"in {time.perf_counter() - t0:.1f} s on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
  server.run()
  if loop.error is not None:
    print(f"error: the engine loop failed: {loop.error!r}", file=sys.stderr)
    return 1
  return 0


def build_engine(args, log) -> tuple:
  """(engine, tokenizer, served model name, dtype) from the flags, warmed up unless --no-warmup; runs
  where the engine runs (the engine process by default). log(line) reports the warm-up's progress."""
  from kvrm_jax.serve.engine_loop import (UserError, compile_cache, load_model, load_preset, make_engine,
                                          warm_up)
  compile_cache.from_args(args)
  t0 = time.perf_counter()
  cfg, model, tok, mesh, dtype, path = load_preset(args) if args.preset else load_model(args)
  what = f"random weights of {args.preset}" if args.preset else f"model {os.path.basename(os.path.normpath(str(path)))}"
  log(f"{what} ({dtype}) loaded in {time.perf_counter() - t0:.1f} s")
  max_len = args.max_len or min(cfg.max_position, 4096)
  if not 1 < max_len <= cfg.max_position:
    raise UserError(f"--max-len must be in [2, {cfg.max_position}] (the model context), got {max_len}")
  mb = math.ceil(max_len / args.block_size)
  slots = args.max_slots or 16
  engine = make_engine(args, cfg, model, tok, mesh, dtype, max_slots=slots, num_blocks=args.num_blocks or slots * mb + 1,
                       max_blocks_per_seq=mb)
  if args.compile_in_background:
    log("warm-up: compiling the decode step and the largest "
        f"{'tile' if engine.rt.step_tokens else 'prefill'} bucket before listening, the others after")
    warm_up(engine, log=log, background=True)
  elif not args.no_warmup:
    log(f"warm-up: compiling the decode step and every {'tile' if engine.rt.step_tokens else 'prefill'} bucket "
        "before listening")
    warm_up(engine, log=log)
  name = args.served_model_name or os.path.basename(os.path.normpath(str(path)))
  return engine, tok, name, dtype


def _server_class(uvicorn):
  """uvicorn's Server with our shutdown (defined once uvicorn is imported)."""

  class _Server(uvicorn.Server):
    """uvicorn's server with our shutdown: on the first SIGTERM/SIGINT `drain` runs in a thread (new
    requests get 503, in-flight ones finish or are aborted), then uvicorn shuts down; a second signal
    exits at once. The process ends with status 0 (uvicorn would re-raise the signal after its own
    graceful shutdown, ending the process with -15)."""

    def __init__(self, config, drain):
      super().__init__(config)
      self._drain, self._draining = drain, False

    @contextlib.contextmanager
    def capture_signals(self):
      old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
      try:
        yield
      finally:
        for sig, handler in old.items():
          signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
      if self._draining:
        super().handle_exit(sig, frame)
        return
      self._draining = True

      def run():
        self._drain()
        self.should_exit = True
      threading.Thread(target=run, name="kvrm-drain", daemon=True).start()

  return _Server


if __name__ == "__main__":
  sys.exit(main())
