#!/usr/bin/env python3
"""Time the projection GEMMs at decode row counts: XLA, cuBLAS and the skinny Mosaic GPU kernel.

The code lives in kvrm_jax/bench/gemm_bench.py; run with --help for the options."""

import sys

from kvrm_jax.bench.gemm_bench import main

if __name__ == "__main__":
  sys.exit(main())
