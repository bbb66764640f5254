#!/usr/bin/env python3
"""End-to-end decode step time against the roofline (weights + KV bytes over measured bandwidth).

The code lives in kvrm_jax/bench/step_bench.py; run with --help for the options."""

import sys

from kvrm_jax.bench.step_bench import main

if __name__ == "__main__":
  sys.exit(main())
