#!/usr/bin/env python3
"""An OpenAI-compatible HTTP server on the engine (same as the `kvrm-serve` console script).

  python scripts/serve.py                                   # bundled SmolLM2-135M-Instruct on 127.0.0.1:8000
  python scripts/serve.py --checkpoint ckpt/ --port 8080 --max-slots 64 --max-len 4096
  curl localhost:8000/v1/completions -H 'content-type: application/json' \\
      -d '{"model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 16}'

Endpoints: /v1/completions, /v1/chat/completions (stream: true for server-sent events), /v1/models,
/health, /metrics (Prometheus). `python scripts/serve.py --help` lists the flags.
"""

import sys

from kvrm_jax.serve.server import main

if __name__ == "__main__":
  sys.exit(main())
