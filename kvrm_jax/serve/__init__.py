"""An OpenAI-compatible HTTP server on the engine (`scripts/serve.py`, console script `kvrm-serve`).

- `server`: flags, start-up and uvicorn (`kvrm-serve`); it imports only the standard library before
  `spawn` has started the engine process, so both processes import jax at once;
- `spawn`: starts the engine process, which waits for what to build;
- `engine_loop`: the engine in its own process or a thread; requests in and token events out;
- `detok`: incremental detokenization that never emits a broken multi-byte character, and stop strings;
- `schemas`: pydantic request / response bodies of the OpenAI API;
- `metrics`: the Prometheus metrics of `/metrics`;
- `app`: the FastAPI application.
"""
