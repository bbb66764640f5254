"""The benchmarks: a library, and one module per benchmark whose `main` is a script's entry point.

Library (re-exported here, used as one namespace: `from kvrm_jax import bench as bc`):
- `workloads`: synthetic request families and production-trace windows;
- `engines`: models (random-weight presets or the bundled checkpoint), the equal-KV-budget plan and
  the two engines built on it;
- `runner`: the recording run loop around `engine.step()` and the metrics of one run;
- `metrics`: percentiles, CDFs and down-sampled series;
- `results` / `report`: run metadata, raw JSON, and the markdown + PNG report;
- `cupti`: per-kernel device times on NVIDIA GPUs.

Benchmarks (scripts/ holds their entry points): `offline` (bench_decode.py), `replay`
(replay_trace.py), `hf_peer` + `hf_setup` + `hf_report` (bench_hf_peer.py), `kernels` + `kernels_report`
(bench_kernels.py), `step_bench` + `profile` (bench_step.py), `gemm_bench` (bench_gemm.py), `sampler_bench`
(bench_sampler.py), `tier_bench` (bench_tier.py), `host` (bench_host.py), `summaries_eval` (eval_summaries.py).
"""

from kvrm_jax import compile_cache  # noqa: F401
from kvrm_jax.cli import UserError, run_main  # noqa: F401
from kvrm_jax.bench.workloads import (  # noqa: F401
    FAMILIES, DESCRIPTIONS, TRACES_ENV, make_workload, describe, parse_families, family_args, check_max_wall,
    resolve_trace, parse_timestamp, load_trace, trace_name)
from kvrm_jax.bench.engines import (  # noqa: F401
    MODELS, ENGINES, add_engine_args, add_budget_args, add_output_args, Setup, setup, parse_engines,
    parse_int_list, command_line, default_dtype, load_model, model_info, kv_block_bytes, prompt_flops,
    matmul_tflops, Budget, plan_budget, runtime_for, check_engines, build_engine, attention_of, engine_record,
    free_device_memory)
from kvrm_jax.bench.runner import (  # noqa: F401
    Mark, Runner, progress_bar)
from kvrm_jax.bench.metrics import (  # noqa: F401
    SPIKE_FACTOR, pct, ratio_of, cdf, compact)
from kvrm_jax.bench.results import (  # noqa: F401
    environment, device_tag, default_label, default_note, write_json, read_json, check_outputs)
from kvrm_jax.bench.report import (  # noqa: F401
    ROOT, TARGETS, GPU_COMMON, GPU_COMMANDS, HEADER, update_report, png_path, meta_lines, fmt, nbytes,
    engine_row, TABLE_HEAD, table, COLORS, plt, plot_itl_cdf, plot_kv, savefig, regenerate, report_main,
    publish)
from kvrm_jax.bench.cupti import (  # noqa: F401
    cupti_ext, kernel_timings)
