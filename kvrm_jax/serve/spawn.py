"""Start the engine process before the server imports anything heavy.

A spawned process imports jax, the engine and the model code again (seconds on a CPU); the server
starts it first thing (`kvrm_jax.serve.server.main`), so those imports run while the server
imports its own and parses its flags. The process then waits for what to build: `EngineProcess`
sends ("build", build, args) down the pipe. The process ends when the server's process does,
killed or crashed included. This module imports nothing from kvrm_jax or jax.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading


class Spawned:
  """An engine process started by `spawn()`, waiting for its build command on `conn`."""

  def __init__(self, proc, conn):
    self.proc, self.conn = proc, conn
    self.sent = False  # the build command went down the pipe: EngineProcess owns the process

  def close(self) -> None:
    """End a process that never got its build command (the server failed before sending it): it has
    only imported, nothing to clean up."""
    self.conn.close()
    self.proc.terminate()
    self.proc.join(5)
    if self.proc.is_alive():
      self.proc.kill()
      self.proc.join(5)


def spawn() -> Spawned:
  ctx = mp.get_context("spawn")  # never fork a process that may hold an accelerator
  conn, child = ctx.Pipe()
  proc = ctx.Process(target=_main, args=(child,), name="kvrm-engine", daemon=True)
  proc.start()
  child.close()
  return Spawned(proc, conn)


def send_build(spawned: Spawned, build, args) -> None:
  """Tell a spawned process what to build: `build(args, log)` (kvrm_jax.serve.engine_loop.engine_main)."""
  spawned.conn.send(("build", build, args))
  spawned.sent = True


def _exit_with(parent) -> None:
  """End this process at once when `parent` (the server) ends: killed or crashed, it can no longer
  stop the engine, which would otherwise keep the accelerator (and compile for no one)."""
  from multiprocessing.connection import wait
  wait([parent.sentinel])
  os._exit(0)


def _main(conn) -> None:
  # The server handles SIGINT (a terminal's Ctrl-C reaches the whole process group) and tells the
  # engine to stop; SIGTERM still ends a process that is waiting for its build command.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  parent = mp.parent_process()
  if parent is not None:
    threading.Thread(target=_exit_with, args=(parent,), name="kvrm-server-watch", daemon=True).start()
  from kvrm_jax.serve.engine_loop import engine_main  # the imports that overlap the server's
  try:
    msg = conn.recv()
  except EOFError:  # the server ended first (a bad flag, say)
    return
  engine_main(conn, *msg[1:])
