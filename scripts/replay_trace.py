#!/usr/bin/env python3
"""Replay a production trace (arrival times + token counts) through KV-RM and the static baseline.

The code lives in kvrm_jax/bench/replay.py; run with --help for the options."""

import sys

from kvrm_jax.bench.replay import main

if __name__ == "__main__":
  sys.exit(main())
