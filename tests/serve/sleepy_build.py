"""A build for the engine process that never finishes (tests/serve/test_serve.py: the engine process
ends with its server)."""

import time


def build(args, log):
  log("building")
  time.sleep(600)
