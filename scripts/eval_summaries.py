#!/usr/bin/env python3
"""Quality of bounded far-history summaries against exact attention, on long texts.

The code lives in kvrm_jax/bench/summaries_eval.py; run with --help for the options."""

import sys

from kvrm_jax.bench.summaries_eval import main

if __name__ == "__main__":
  sys.exit(main())
