#!/usr/bin/env python3
"""Offline decode throughput: KV-RM against the static-graph baseline, same requests, same KV budget.

The code lives in kvrm_jax/bench/offline.py; run with --help for the options."""

import sys

from kvrm_jax.bench.offline import main

if __name__ == "__main__":
  sys.exit(main())
