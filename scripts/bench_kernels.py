#!/usr/bin/env python3
"""Benchmark paged decode attention on one GPU; writes JSON, docs/kernels.md and a PNG.

The code lives in kvrm_jax/bench/kernels.py; run with --help for the options."""

import sys

from kvrm_jax.bench.kernels import main

if __name__ == "__main__":
  sys.exit(main())
