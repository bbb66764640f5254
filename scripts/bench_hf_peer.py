#!/usr/bin/env python3
"""HF transformers peer: bench_decode's requests through transformers' continuous batching (paged KV).

The code lives in kvrm_jax/bench/hf_peer.py; run with --help for the options."""

import sys

from kvrm_jax.bench.hf_peer import main

if __name__ == "__main__":
  sys.exit(main())
