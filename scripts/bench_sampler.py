#!/usr/bin/env python3
"""Time the decode step's sampler alone: each route, branching and branch-free.

The code lives in kvrm_jax/bench/sampler_bench.py; run with --help for the options."""

import sys

from kvrm_jax.bench.sampler_bench import main

if __name__ == "__main__":
  sys.exit(main())
