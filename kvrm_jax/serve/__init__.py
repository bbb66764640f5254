"""An OpenAI-compatible HTTP server on the engine (`scripts/serve.py`, console script `kvrm-serve`).

- `engine_loop`: the engine in one thread; requests in and token events out through thread-safe queues;
- `detok`: incremental detokenization that never emits a broken multi-byte character, and stop strings;
- `schemas`: pydantic request / response bodies of the OpenAI API;
- `metrics`: the Prometheus metrics of `/metrics`;
- `app`: the FastAPI application.
"""
