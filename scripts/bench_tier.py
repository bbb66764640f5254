#!/usr/bin/env python3
"""Host memory tier benchmark: a workload whose KV exceeds the device (HBM) KV budget.

The code lives in kvrm_jax/bench/tier_bench.py; run with --help for the options."""

import sys

from kvrm_jax.bench.tier_bench import main

if __name__ == "__main__":
  sys.exit(main())
