#!/usr/bin/env python3
"""Host overhead of one decode step: scheduling plus building the descriptor, no device work.

The code lives in kvrm_jax/bench/host.py; run with --help for the options."""

import sys

from kvrm_jax.bench.host import main

if __name__ == "__main__":
  sys.exit(main())
