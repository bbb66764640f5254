"""The benchmark scripts (entry points of kvrm_jax/bench/) end to end on the
tiny model (CPU, small): every request accounted for, the raw JSON carries the metrics, the report
regenerates from it."""

import json
import re
import sys

import numpy as np
import pytest
from conftest import load_script

from kvrm_jax import bench as bc
from kvrm_jax.bench import hf_report, kernels

bench_decode = load_script("bench_decode")
replay_trace = load_script("replay_trace")
bench_hf_peer = load_script("bench_hf_peer")
bench_tier = load_script("bench_tier")
bench_host = load_script("bench_host")
eval_summaries = load_script("eval_summaries")

# max_len 128 in blocks of 8: 16 blocks per static slot; a 40-block budget gives the static
# baseline 2 slots and KV-RM 8 slots on the same blocks.
SMALL = ["--model", "tiny", "--block-size", "8", "--max-len", "128", "--kv-budget-blocks", "40",
         "--prefill-buckets", "16,64", "--quiet"]
METRICS = ("tokens_per_s", "ttft_ms", "itl_ms", "itl_cdf_ms", "queue_ms", "step_ms", "spikes", "kv",
           "mean_groups_per_seq", "moves", "preemptions", "host_us", "compiles_during_run", "series")


def section(text, label):
  m = re.search(f"<!-- BEGIN {label} -->\n(.*?)<!-- END {label} -->", text, flags=re.S)
  assert m, label
  return m.group(1)


def check_engines(obj):
  b = obj["budget"]
  assert b["static_slots"] == b["budget_blocks"] // b["max_blocks_per_seq"] == 2
  assert b["kvrm_slots"] == 8
  rts = {k: e["runtime"] for k, e in obj["engines"].items()}
  assert rts["kvrm"]["num_blocks"] == b["budget_blocks"] + 1  # + the null block
  if "kvrm-mixed" in rts:  # the same pool and slots, one mixed step per engine step
    assert rts["kvrm-mixed"]["num_blocks"] == rts["kvrm"]["num_blocks"]
    assert rts["kvrm-mixed"]["step_tokens"] == rts["kvrm"]["max_slots"] + 2048 and rts["kvrm"]["step_tokens"] == 0
  assert rts["static"]["num_blocks"] == 1 + b["static_slots"] * b["max_blocks_per_seq"] <= b["budget_blocks"] + 1
  for e in obj["engines"].values():
    assert e["decode_compiles"] == 1
    assert e["compiles_during_runs"] == {"decode": 0, "prefill": 0}  # the warm-up compiled everything


def check_run(m, n_requests, output_tokens):
  for key in METRICS:
    assert key in m, key
  assert m["requests"] == n_requests
  assert m["completed"] + m["rejected"] + m["unfinished"] == n_requests
  assert m["completed"] == n_requests and m["rejected"] == 0 and m["unfinished"] == 0
  assert m["generated_tokens"] == output_tokens  # forced lengths: both engines do the same work
  assert m["tokens_per_s"] > 0 and m["steps"] > 0
  if output_tokens == n_requests:  # one token each (prefill only): no inter-token latency, no decode step
    return
  for k in ("p50", "p90", "p99", "max"):
    assert m["itl_ms"][k] is not None and m["itl_ms"][k] >= 0
  assert m["kv"]["peak_reserved_bytes"] >= m["kv"]["peak_live_bytes"] > 0
  assert m["series"]["steps"] and m["series"]["kv"]


def test_bench_decode_end_to_end_and_report_from_json(tmp_path, capsys):
  out, md = tmp_path / "raw" / "decode.json", tmp_path / "docs" / "results.md"
  argv = SMALL + ["--families", "uniform,mixed,longtail,shared-prefix,prefill", "--num-requests", "6",
                  "--out-json", str(out), "--report", str(md), "--label", "decode-test"]
  assert bench_decode.main(argv) == 0, capsys.readouterr().err
  printed = capsys.readouterr().out
  obj = json.loads(out.read_text())
  assert obj["kind"] == "bench_decode" and obj["command"].startswith("python scripts/bench_decode.py")
  # Warm-up progress: a line per executable as it is compiled, each engine's own.
  for kind, e in obj["engines"].items():
    lines = re.findall(rf"^\[{re.escape(kind)}\] compiled the (.+) in \d+\.\d s$", printed, re.M)
    assert len(lines) == e["decode_compiles"] + e["prefill_compiles"] and "decode step" in lines, printed
  for key in ("date", "device", "backend", "jax"):
    assert key in obj["env"]
  check_engines(obj)
  assert set(obj["results"]) == {"uniform", "mixed", "longtail", "shared-prefix", "prefill"}
  pf = obj["workloads"]["prefill"]
  assert pf["output_tokens"]["max"] == 1 and pf["prompt_tokens"]["max"] == 128 // 2 and pf["matmul_tflops"] > 0
  mi = obj["model"]  # matmul FLOPs at least 2 per weight per prompt token (embedding and LM head aside)
  assert pf["flops"] >= 2 * (mi["params"] - 2 * mi["vocab"] * mi["hidden"]) * 6 * 64
  for k, m in obj["results"]["prefill"].items():
    assert m["prompt_tokens"] == 6 * 64 and m["prompt_tokens_per_s"] > 0
    pp = m["prompt_positions"]  # every prompt token computed once, in positions of whole buckets
    assert pp["tokens"] == 6 * 64 and pp["positions"] >= pp["tokens"] and pp["padding"] == 1 - 384 / pp["positions"]
    assert m["step_ms_with_prompt"]["p50"] is not None
  for fam, per in obj["results"].items():
    assert set(per) == {"kvrm", "kvrm-mixed", "static"}
    w = obj["workloads"][fam]
    assert w["num_requests"] == 6 and w["prompt_tokens"]["max"] + w["output_tokens"]["max"] <= 2 * 128
    for m in per.values():
      check_run(m, 6, w["output_tokens"]["total"])
  assert obj["results"]["shared-prefix"]["static"]["prefix_hit_blocks"] == 0  # no sharing in the baseline
  text = md.read_text()
  # the machine the run was on; runs on a CPU are labelled smoke scale by default
  title = "CPU, tiny model, smoke scale" if obj["env"]["backend"] == "cpu" else f"{obj['env']['device']}, tiny model"
  assert f"## Offline decode: {title}\n" in text and "<!-- BEGIN decode-test -->" in text
  pp = obj["results"]["prefill"]["kvrm-mixed"]["prompt_positions"]
  assert f"prefill / kvrm-mixed: 384 prompt tokens in {pp['positions']:,} ({100 * pp['padding']:.0f} % padding)" in text
  for what in ("throughput", "itl_cdf", "kv"):
    assert (md.parent / f"results_decode-test_{what}.png").stat().st_size > 0
  # Regenerate from the raw JSON alone: the same page, and other sections are kept.
  md2 = tmp_path / "again" / "results.md"
  md2.parent.mkdir()
  md2.write_text("<!-- BEGIN other -->\nkeep me\n<!-- END other -->\n")
  assert bench_decode.main(["--from-json", str(out), "--report", str(md2)]) == 0
  again = md2.read_text()
  assert "keep me" in again and section(again, "decode-test") == section(text, "decode-test")
  assert section(again, "header") == section(text, "header")
  assert (md2.parent / "results_decode-test_kv.png").is_file()


def test_replay_trace_end_to_end_and_report_from_json(tmp_path, capsys, trace_files):
  csv_path, jsonl_path = trace_files
  out, md = tmp_path / "raw" / "replay.json", tmp_path / "results.md"
  argv = SMALL + ["--trace", str(csv_path), "--start", "0.4", "--duration", "10", "--max-requests", "10",
                  "--trace", str(jsonl_path), "--start", "0", "--time-scale", "2", "--max-prompt", "96",
                  "--max-output", "16", "--out-json", str(out), "--report", str(md), "--label", "replay-test"]
  assert replay_trace.main(argv) == 0, capsys.readouterr().err
  obj = json.loads(out.read_text())
  assert obj["kind"] == "replay_trace"
  check_engines(obj)
  csv_t, jsonl_t = obj["traces"]
  assert csv_t["selected"] == 10 and csv_t["clipped"]["prompt"] == 1  # window [0.4, 10.4) s, first 10
  assert jsonl_t["selected"] == 6 and jsonl_t["clipped"] == {"prompt": 0, "output": 0, "context": 0}
  assert csv_t["arrivals"]["burst_bins"]  # the 6 arrivals in 0.3 s are marked as a burst
  for t in obj["traces"]:
    for m in t["results"].values():
      check_run(m, t["selected"], t["tokens"]["output_total"])
      assert m["queue_ms"]["p50"] is not None and m["queue_ms"]["p50"] >= 0
  text = md.read_text()
  for name in ("test", "burst"):
    assert f"<!-- BEGIN replay-test-{name} -->" in text
    for what in ("steps", "itl_kv"):
      assert (tmp_path / f"results_replay-test-{name}_{what}.png").stat().st_size > 0
  md2 = tmp_path / "again.md"
  assert replay_trace.main(["--from-json", str(out), "--report", str(md2)]) == 0
  assert md2.read_text() == text


@pytest.mark.parametrize("script,argv", [
    ("decode", ["--families", "nope"]),
    ("decode", ["--engines", "kvrm,vllm"]),
    ("decode", ["--kv-budget-blocks", "4", "--max-len", "128"]),
    ("decode", ["--tp", "3"]),
    ("decode", ["--model", "tiny", "--matmul", "skinny"]),
    ("decode", ["--compile-threads", "0"]),
    ("decode", ["--max-len", "0"]),
    ("decode", ["--kv-budget-gb", "-1"]),
    ("decode", ["--kv-budget-blocks", "0"]),
    ("replay", []),
    ("replay", ["--trace", "TRACE", "--time-scale", "0"]),
    ("replay", ["--trace", "TRACE", "--start", "-1"]),
    ("replay", ["--trace", "TRACE", "--duration", "0"]),
    ("replay", ["--trace", "TRACE", "--max-prompt", "0"]),
    ("replay", ["--trace", "TRACE", "--max-output", "0"]),
    ("replay", ["--trace", "TRACE", "--max-requests", "0"]),
    ("replay", ["--trace", "/nonexistent/trace.csv"]),
])
def test_bad_input_is_one_clear_line(script, argv, tmp_path, capsys, trace_files):
  mod = bench_decode if script == "decode" else replay_trace
  argv = [str(trace_files[0]) if a == "TRACE" else a for a in argv]  # a real trace: the flag is what is wrong
  assert mod.main(argv + ["--quiet"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ")


@pytest.mark.parametrize("script,argv,message", [
    ("decode", ["--tile", "0"], "tile must be positive, got 0"),
    ("decode", ["--tile-counts", "3,2"], "tile_counts must be strictly ascending"),
    ("decode", ["--step-tokens", "-5"], "step_tokens must be 0"),
    ("decode", ["--decode-buckets", "0"], "--decode-buckets must list positive integers"),
    ("replay", ["--tile", "0"], "tile must be positive, got 0"),
])
def test_a_flag_of_the_last_engine_is_checked_before_the_first_runs(script, argv, message, capsys, trace_files):
  """Flags only the mixed-step engine reads are refused before the static engine, listed first, has
  compiled and run (minutes on a GPU): one error line, and no engine's warm-up in the output."""
  mod = bench_decode if script == "decode" else replay_trace
  work = ["--num-requests", "4"] if script == "decode" else ["--trace", str(trace_files[0])]
  assert mod.main(["--model", "tiny", "--engines", "static,kvrm-mixed", "--quiet"] + work + argv) == 2
  out, err = capsys.readouterr()
  err = err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
  assert "warm-up" not in out and "[static" not in out, out


def test_from_json_of_the_wrong_kind(tmp_path, capsys):
  p = tmp_path / "x.json"
  p.write_text(json.dumps({"kind": "bench_decode"}))
  assert replay_trace.main(["--from-json", str(p), "--report", str(tmp_path / "r.md")]) == 2
  assert "not 'replay_trace'" in capsys.readouterr().err


def test_bench_step_layer_loops_profile_and_hlo(tmp_path, capsys, monkeypatch):
  """scripts/bench_step.py on the tiny model: scan and unroll rows, the CUPTI breakdown (a fake
  extension stands in for the jax CUDA plugin's on CPU), the weight-copy count of the dumped HLO."""
  import jax
  bench_step = load_script("bench_step")
  from kvrm_jax.bench import cupti

  launches = [("nvjet_tst_64x8_64x16_TNT", 0.30), ("paged_decode_mgpu_c128_st2", 0.05),
              ("loop_dynamic_slice_fusion_3", 0.02), ("loop_dynamic_slice_fusion_4", 0.02),
              ("copy_blocks_h8", 0.01), ("input_reduce_fusion", 0.01),
              ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 0.02), ("psum_448_0_fusion", 0.01)]

  class FakeExt:
    def _cupti_init(self):
      pass

    def _cupti_get_timings(self, finalize):
      return launches * 2  # the 2 profiled steps

  monkeypatch.setattr(cupti, "cupti_ext", FakeExt)
  out = tmp_path / "step.json"
  argv = ["--model", "tiny", "--dtype", "float32", "--batches", "4", "--context", "64", "--warmup", "1",
          "--iters", "2", "--layer-loop", "scan", "unroll", "--profile", "2", "--dump-hlo", str(tmp_path / "hlo"),
          "--xla-options", "xla_gpu_enable_triton_gemm=false", "--out-json", str(out), "--tp", "1"]
  two = len(jax.devices()) >= 2  # CPU: 2 forced host devices; a one-GPU machine runs tp=1 only
  if two:
    argv.append("2")
  else:
    with pytest.raises(SystemExit):  # one clear error line before anything is built
      bench_step.main(argv + ["2"])
    assert "--tp 2 needs 2 devices; this machine has 1" in capsys.readouterr().err
  assert bench_step.main(argv) == 0
  text = capsys.readouterr().out
  obj = json.loads(out.read_text())
  assert "xla_flags" in obj["meta"]
  rows = obj["rows"]
  assert [(r["tp"], r["layer_loop"]) for r in rows] == \
      [(1, "scan"), (1, "unroll")] + ([(2, "scan"), (2, "unroll")] if two else [])
  assert all(r["xla_options"] == "xla_gpu_enable_triton_gemm=false" for r in rows)
  if two:  # tp=2: each device reads half the KV (the tiny model's 2 KV heads split) and its weight shards
    assert rows[2]["kv_bytes_read"] * 2 == rows[0]["kv_bytes_read"]
    assert rows[0]["weight_bytes"] / 2 < rows[2]["weight_bytes"] < rows[0]["weight_bytes"]  # embeddings replicated
  for r in rows:
    assert "error" not in r and r["steps_timed"] == 2 and r["decode_compiles"] == 1
    prof = r["profile"]
    assert prof["device_ms_per_step"] == pytest.approx(0.44)
    assert prof["buckets_ms_per_step"] == pytest.approx({"matmul": 0.30, "attention": 0.05, "collectives": 0.03,
                                                         "copies": 0.04, "other": 0.02})
    assert prof["kernels"][0] == {"name": "nvjet_tst_64x8_64x16_TNT", "ms_per_step": 0.30, "calls_per_step": 1.0}
    assert {"name": "loop_dynamic_slice_fusion", "ms_per_step": pytest.approx(0.04), "calls_per_step": 2.0} \
        in prof["kernel_families"]
    assert prof["matmul_tb_s"] > 0
  if jax.default_backend() == "cpu":  # XLA:CPU materializes every weight slice; the GPU may fuse them
    n_layers, n_proj = 2, 4  # wqkv, wo, w_gate_up, w_down
    assert rows[0]["hlo"]["dynamic-slice"] == rows[0]["hlo"]["in_loop_bodies"] == n_proj  # one scan body
    assert rows[1]["hlo"]["slice"] == n_layers * n_proj and rows[1]["hlo"]["in_loop_bodies"] == 0
  if two:
    assert "### profile unroll b4 c64 [xla_gpu_enable_triton_gemm=false] tp=2" in text
    assert (tmp_path / "hlo" / "decode_unroll_b4_c64_xla_gpu_enable_triton_gemm_false_tp2.hlo.txt").stat().st_size > 0
  assert (tmp_path / "hlo" / "decode_unroll_b4_c64_xla_gpu_enable_triton_gemm_false.hlo.txt").stat().st_size > 0
  assert "### profile unroll b4 c64 [xla_gpu_enable_triton_gemm=false]" in text and "| matmul | 0.300 |" in text


def test_bench_step_sampling_and_pipelined_rows(tmp_path, capsys):
  """--sampling greedy sampled: a row each; --pipeline: the engine's own pipelined loop timed too."""
  bench_step = load_script("bench_step")
  out = tmp_path / "s.json"
  assert bench_step.main(["--model", "tiny", "--dtype", "float32", "--batches", "3", "--context", "32", "--warmup",
                          "1", "--iters", "3", "--sampling", "greedy", "sampled", "--pipeline", "--out-json",
                          str(out)]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [r["sampling"] for r in rows] == ["greedy", "sampled"]
  for r in rows:
    assert "error" not in r and r["decode_compiles"] == 1
    assert r["pipelined_ms_median"] > 0 and r["pipelined_steps"] >= 3
  printed = capsys.readouterr().out
  assert "| 3 | 32 | off | sampled |" in printed
  import jax
  if jax.default_backend() == "cpu":  # no CUDA device: no copy ceiling, no roofline: "-", never "nan"
    assert "copy ceiling not measured" in printed and "nan" not in printed and "| - | - |" in printed


def test_bench_step_steps_with_prompt_work(tmp_path, capsys):
  """--prompt-tokens: decode rows plus the last P tokens of a prompt, as one mixed step and as a
  prefill call then the decode call, for each prompt attention; FLOPs of the chunk counted once."""
  bench_step = load_script("bench_step")
  from kvrm_jax.bench import engines
  from kvrm_jax.config import ModelConfig
  out = tmp_path / "prompt.json"
  argv = ["--model", "tiny", "--dtype", "float32", "--batches", "3", "--context", "160", "--warmup", "0",
          "--iters", "2", "--prompt-tokens", "96", "200", "--prompt-attention", "gather", "kernel", "--out-json",
          str(out)]
  assert bench_step.main(argv) == 0
  text = capsys.readouterr().out
  rows = json.loads(out.read_text())["prompt_rows"]
  ok = [r for r in rows if r["prompt_tokens"] == 96]
  assert [(r["mode"], r["prompt_attention"]) for r in ok] == [
      ("mixed", "gather"), ("mixed", "kernel"), ("split", "gather"), ("split", "kernel")]
  cfg = ModelConfig.from_name("tiny")
  chunk = engines.prompt_flops(cfg, [160]) - engines.prompt_flops(cfg, [160 - 96])  # the chunk's own work
  heads = 2 * cfg.hidden_size * cfg.vocab_size * (3 + 1)  # an LM head row per sampled token
  decode = engines.layer_flops_per_token(cfg) * 3 + heads
  for r in ok:
    assert "error" not in r and r["steps_timed"] == 2 and r["step_ms_median"] > 0
    assert r["flops"] == pytest.approx(chunk + decode)
    assert r["compiles"] == ({"decode": 0, "prefill": 0, "mixed": 1} if r["mode"] == "mixed"
                             else {"decode": 1, "prefill": 1, "mixed": 0})
  assert all("--prompt-tokens 200 > --context 160" in r["error"] for r in rows if r["prompt_tokens"] == 200)
  assert "| mixed | kernel | 3 | 160 | 96 |" in text


# ----------------------------------------------------------------------------- the HF transformers peer

HF_SMALL = ["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--block-size", "8", "--max-len", "128",
            "--kv-budget-blocks", "40", "--quiet"]
HF_METRICS = ("tokens_per_s", "ttft_ms", "itl_ms", "itl_cdf_ms", "queue_ms", "e2e_ms", "steps", "length_mismatches",
              "gpu_memory", "step_ms", "spikes", "kv", "preemptions")


def test_hf_peer_end_to_end_and_report_from_json(tmp_path, capsys):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  out, md = tmp_path / "raw" / "hf.json", tmp_path / "docs" / "results.md"
  fams = ["uniform", "mixed"]
  argv = HF_SMALL + ["--families", ",".join(fams), "--num-requests", "5", "--out-json", str(out), "--report", str(md),
                     "--label", "hf-test"]
  assert bench_hf_peer.main(argv) == 0, capsys.readouterr().err
  obj = json.loads(out.read_text())
  assert obj["kind"] == "bench_hf_peer" and obj["meta"]["command"].startswith("python scripts/bench_hf_peer.py")
  for key in ("date", "device", "backend", "torch", "transformers"):
    assert obj["meta"][key]
  assert obj["budget"]["budget_blocks"] == 40 and obj["budget"]["max_len"] == 128
  for i, fam in enumerate(fams):
    # bench_decode's requests for the same flags: family i of --families seeded with [seed, i]
    expected = bc.make_workload(fam, 5, 128, 256, np.random.default_rng([0, i]))
    w = obj["workloads"][fam]
    assert {k: v for k, v in w.items() if k != "description"} == bc.describe(expected)
    m = obj["results"][fam]["hf"]
    for key in HF_METRICS:
      assert key in m, key
    assert m["requests"] == m["completed"] == 5 and m["rejected"] == m["unfinished"] == 0
    assert m["generated_tokens"] == w["output_tokens"]["total"] and m["length_mismatches"] == 0  # forced lengths
    assert m["tokens_per_s"] > 0 and m["steps"] > 0 and not m["cut_by_max_wall"] and not m["errors"]
    for k in ("p50", "p90", "p99", "max"):
      assert m["itl_ms"][k] is not None and m["itl_ms"][k] >= 0
    assert 0 < m["ttft_ms"]["p50"] <= m["e2e_ms"]["p99"]
    assert m["step_ms"] is None and m["kv"]["peak_reserved_bytes"] is None  # not exposed by HF: null, not estimated
    assert m["gpu_memory"]["peak_allocated_bytes"] is None  # CPU
    e = obj["engines"][fam]
    assert e["num_blocks"] == 40 and e["block_size"] == 8
    assert e["kv_cache_bytes"] >= obj["budget"]["budget_bytes"] == 40 * obj["budget"]["block_bytes"]
  text = md.read_text()
  assert "## HF transformers peer (continuous batching): CPU, tiny model, smoke scale" in text
  assert (md.parent / "results_hf-test_itl_cdf.png").stat().st_size > 0
  md2 = tmp_path / "again.md"
  assert bench_hf_peer.main(["--from-json", str(out), "--report", str(md2)]) == 0
  assert section(md2.read_text(), "hf-test") == section(text, "hf-test")
  # bench_decode rows beside HF's, checked for the same model, budget and requests.
  dec = {"kind": "bench_decode", "label": "d", "command": "python scripts/bench_decode.py", "model": obj["model"],
         "env": {"date": "today", "device": "cpu"}, "budget": obj["budget"], "workloads": obj["workloads"],
         "results": {f: {"kvrm": obj["results"][f]["hf"]} for f in fams}}
  obj["compare"] = hf_report.compare_excerpt(dec, "decode.json", obj)
  md3 = tmp_path / "cmp.md"
  hf_report.render(obj, str(md3))
  body = section(md3.read_text(), "hf-test")
  assert "| mixed | kvrm (bench_decode) |" in body and "same model, KV budget and requests" in body


@pytest.mark.parametrize("argv", [
    ["--families", "nope"],
    ["--num-requests", "0"],
    ["--kv-budget-blocks", "4", "--max-len", "128"],
    ["--device", "tpu"],
])
def test_hf_peer_bad_input_is_one_clear_line(argv, capsys):
  pytest.importorskip("transformers")
  assert bench_hf_peer.main(argv + ["--quiet"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ")


def test_hf_peer_without_continuous_batching(monkeypatch, capsys):
  pytest.importorskip("transformers")
  monkeypatch.setitem(sys.modules, "transformers.generation.continuous_batching", None)  # import fails
  assert bench_hf_peer.main(["--quiet"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: transformers ") and "no continuous batching" in err[0]


def test_bench_kernels_variants_and_report(tmp_path):
  """bench_kernels.py: the variant syntax, and the report regenerated from a run's JSON (two
  runs merged, the later row winning) with its target lines."""
  bench_kernels = load_script("bench_kernels")
  assert kernels.parse_variants("auto,128:2:auto,64:3:1:4,64:2") == [
      (None, 2, None, None), (128, 2, None, 1), (64, 3, 1, 4), (64, 2, None, 1)]

  def row(B, layout, ours_ms, jax_ms, streams=1, one_pass_ms=None):
    t = lambda ms: dict(ms=ms, wall_ms=5 * ms, cupti_ms=ms)  # noqa: E731
    return dict(hq=9, hkv=3, d=64, B=B, L=2048, layout=layout, kv_bytes=B * 2048 * 3 * 64 * 4,
                rotations=2, ours=dict(t(ours_ms), variant=dict(chunk_tokens=None, stages=2,
                                                                num_splits=None, streams=None),
                                       tile=dict(chunk_tokens=64, num_splits=1, streams=streams)),
                ours_desc_prebuilt=t(ours_ms * 0.9), jax=dict(t(jax_ms), setting={}), xla=None,
                one_pass=t(one_pass_ms) if one_pass_ms else None)

  meta = dict(device="test", jax="0", date="d", command="c")
  runs = [dict(meta=meta, ceiling=dict(torch=dict(tbps=3.0)),
               results=[row(64, "contiguous", 0.050, 0.062), row(64, "fragmented", 0.051, 0.063),
                        # JAX at 0.77 TB/s (< 40% of 3.0): 2x needs 8.2 us, one pass takes 9.0
                        row(8, "contiguous", 0.0114, 0.0164, one_pass_ms=0.0090)]),
          dict(meta=dict(meta, date="d2"), ceiling=dict(torch=dict(tbps=3.0)),
               results=[row(64, "contiguous", 0.040, 0.062, streams=2)])]
  paths = []
  for i, r in enumerate(runs):
    paths.append(str(tmp_path / f"run{i}.json"))
    with open(paths[-1], "w") as f:
      json.dump(r, f)
  md, png = tmp_path / "k.md", tmp_path / "k.png"
  argv = sys.argv
  sys.argv = ["bench_kernels.py", "--from-json", ",".join(paths), "--md", str(md), "--png", str(png)]
  try:
    bench_kernels.main()
  finally:
    sys.argv = argv
  text = md.read_text()
  rows = [ln for ln in text.split("## Targets")[0].splitlines() if ln.startswith("| 9/3")]
  small = [ln for ln in rows if ln.startswith("| 9/3, 64 | 8 |")]
  assert len(small) == 1 and "| 0.0090 |" in small[0]  # the one-pass column
  assert "MISSED at 9/3 B=8 L=2048 contiguous (1.44x)" in text
  assert "9/3 B=8 L=2048 contiguous: 2x needs 8.2 us, one pass takes 9.0 us" in text
  rows = [ln for ln in rows if ln not in small]
  assert len(rows) == 2 and "0.0400" in rows[0] and "c64 s2 sp1 w2 (auto)" in rows[0] and "0.0360" in rows[0]
  # 100.7 MB in 40 us = 2.52 TB/s = 84% of 3.0; the fragmented row: 51 us = 66%
  assert "min 66% (9/3 B=64 L=2048 fragmented) -> MISSED" in text
  assert "d ; d2" in text


def test_bench_tier_end_to_end_and_report_from_json(tmp_path, capsys):
  """A workload of twice the device KV pool: without the tier requests are preempted and recomputed;
  with swaps their KV goes to host memory and comes back; with placement running requests keep
  cold blocks there and nobody is preempted. Every configuration finishes every request."""
  out, md = tmp_path / "tier.json", tmp_path / "docs" / "tiering.md"
  argv = ["--model", "tiny", "--hbm-gb", "0.0001", "--host-gb", "0.002", "--requests", "6", "--prompt", "96",
          "--output", "16", "--configs", "off", "swap", "place-R2", "--quiet", "--out-json", str(out),
          "--report", str(md)]
  assert bench_tier.main(argv) == 0, capsys.readouterr().err
  printed = capsys.readouterr().out
  obj = json.loads(out.read_text())
  assert obj["meta"]["workload_kv_gb"] > obj["meta"]["hbm_kv_gb"]
  runs = {r["config"]: r for r in obj["runs"]}
  assert list(runs) == ["off", "swap", "place-R2"]
  for name, r in runs.items():
    assert r["completed"] == r["requests"] == 6 and r["generated_tokens"] == 6 * 16, name
    assert re.search(rf"^\[{name}\] compiled the decode step in \d+\.\d s$", printed, re.M), printed
  assert runs["off"]["preemptions"] > 0 and not runs["off"]["tier"]
  sw = runs["swap"]["tier"]
  assert sw["swap_preemptions"] > 0 and sw["swap_in_extents"] == sw["swap_out_extents"] > 0
  pl = runs["place-R2"]
  assert pl["tier"]["placed_blocks"] > 0 and pl["preemptions"] == 0
  text = md.read_text()
  for name in runs:
    assert f"\n| {name} | " in text
  assert (md.parent / "tiering.png").stat().st_size > 0
  again = tmp_path / "again" / "tiering.md"
  again.parent.mkdir()
  assert bench_tier.main(["--from-json", str(out), "--report", str(again)]) == 0
  assert again.read_text() == text


def test_an_output_that_cannot_be_written_fails_before_the_run(tmp_path, capsys):
  """--out-json or --report under a file (not a folder) is one error line and exit code 2 before
  the model is built, not a traceback after the run; a missing folder is created."""
  f = tmp_path / "a-file"
  f.write_text("x")
  cases = [(bench_decode.main, SMALL + ["--out-json", str(f / "o.json")], f / "o.json"),
           (bench_decode.main, SMALL + ["--report", str(f / "r.md")], f / "r.md"),
           (replay_trace.main, ["--model", "tiny", "--trace", "x.csv", "--out-json", str(f / "o.json")], f / "o.json"),
           (bench_tier.main, ["--model", "tiny", "--report", str(f / "t.md")], f / "t.md")]
  for main, argv, path in cases:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [f"error: cannot write {path}: a part of {f} is a file, not a folder"], err
    assert "compiled" not in out and "[bench_decode]" not in out
  out = tmp_path / "new" / "folder" / "o.json"
  assert bench_decode.main(SMALL + ["--families", "uniform", "--num-requests", "2", "--engines", "kvrm",
                                    "--out-json", str(out)]) == 0
  assert json.loads(out.read_text())["kind"] == "bench_decode"


def test_bench_host_times_every_slot_of_every_step(tmp_path, capsys):
  """scripts/bench_host.py: schedule + descriptor time per step at each slot count (every slot
  decodes at every step: the script checks it), the descriptor sizes of the engine's layout."""
  out = tmp_path / "raw" / "host.json"
  assert bench_host.main(["--slots", "4", "16", "--steps", "30", "--out-json", str(out)]) == 0
  obj = json.loads(out.read_text())
  assert obj["meta"]["command"].startswith("python scripts/bench_host.py --slots 4 16")
  r4, r16 = obj["rows"]
  assert (r4["slots"], r16["slots"]) == (4, 16) and r4["steps"] == 30
  for r in (r4, r16):
    assert 0 < r["schedule_us_median"] < r["total_us_median"] <= r["total_us_p99"]
  assert r16["descriptor_int32_words"] > r4["descriptor_int32_words"]
  assert re.search(r"^\| 16 \| \d+ \| \d+ \| \d+ \| \d+ \| \d+ \+ \d+ \|$", capsys.readouterr().out, re.M)


def test_eval_summaries_end_to_end_and_report_from_json(smollm2_ckpt, tmp_path, capsys):
  """scripts/eval_summaries.py on the bundled model: exact attention agrees with itself, each
  setting runs through one compiled decode step, summaries and the drop baseline keep a bounded
  KV per sequence, and the report regenerates from the raw JSON."""
  md, raw = tmp_path / "docs" / "summaries.md", tmp_path / "docs" / "raw" / "summaries.json"
  argv = ["--checkpoint", str(smollm2_ckpt), "--tokens", "96", "--texts", "1", "--windows", "32", "--entries", "4",
          "--out", str(md), "--raw", str(raw)]
  assert eval_summaries.main(argv) == 0
  rows = {r["setting"].split()[0]: r for r in json.loads(raw.read_text())["results"]}
  assert set(rows) == {"exact", "summaries", "drop"}
  assert rows["exact"]["agreement"] == 1.0 and rows["exact"]["kv_blocks_per_seq_end"] is None
  for r in rows.values():
    assert r["decode_compiles"] == 1 and r["ppl"] >= 1.0 and 0.0 <= r["agreement"] <= 1.0
  assert rows["summaries"]["max_entries"] == 4 and rows["drop"]["max_entries"] == 0
  assert 0 < rows["drop"]["kv_blocks_per_seq_end"] <= rows["summaries"]["kv_blocks_per_seq_end"] < 96 // 16
  text = md.read_text()
  assert "| summaries sink=1 window=32 max=4 |" in text and (md.parent / "summaries.png").stat().st_size > 0
  capsys.readouterr()
  again = tmp_path / "again" / "summaries.md"
  assert eval_summaries.main(["--from-json", str(raw), "--out", str(again)]) == 0
  assert again.read_text() == text


@pytest.mark.parametrize("seconds", ["0", "-1", "nan"])
def test_a_max_wall_that_is_not_positive_is_refused(seconds, capsys):
  """--max-wall 0 (or less) used to cut every run at once and report it as a measurement."""
  for main in (bench_decode.main, replay_trace.main, bench_hf_peer.main, bench_tier.main):
    assert main(["--model", "tiny", "--max-wall", seconds]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --max-wall must be a positive number of seconds, got {float(seconds):g}"], err


@pytest.mark.parametrize("args,message", [
    (["--batches", "4", "0"], "--batches must be >= 1, got 0"),
    (["--iters", "0"], "--iters must be >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--prompt-tokens", "128"], "--prompt-tokens 128 exceeds every --context (at most 64)"),
    (["--context", "1020"],
     "--context 1020 plus the 9 tokens the run decodes exceeds the tiny model's context of 1024"),
    (["--matmul", "xla", "skinny"], "--matmul skinny: matmul 'skinny' runs a Mosaic GPU kernel that needs a Hopper"),
])
def test_bench_step_refuses_sizes_no_row_could_run(args, message, capsys):
  """One argparse error before any engine is built, not a table whose every row failed."""
  load = load_script("bench_step")
  with pytest.raises(SystemExit):
    load.main(["--model", "tiny", "--context", "64", "--warmup", "2", "--iters", "5"] + args)
  err = capsys.readouterr().err
  assert f": error: {message}" in err and "Traceback" not in err, err


def test_bench_gemm_rows_report_and_json(tmp_path, capsys, monkeypatch):
  """scripts/bench_gemm.py on the tiny model's shapes: a row per (shape, M, variant) with its time and
  its error against an f32 product; off a Hopper GPU the skinny kernel is left out with a note (on a
  Hopper GPU too, told it has none)."""
  from kvrm_jax.step import gemm
  monkeypatch.setattr(gemm, "kernel_available", lambda: False)
  bench_gemm = load_script("bench_gemm")
  out = tmp_path / "g.json"
  assert bench_gemm.main(["--model", "tiny", "--shapes", "qkv", "down", "--rows", "1", "8", "--variants", "xla",
                          "skinny", "--reps", "1", "--out-json", str(out)]) == 0
  cap = capsys.readouterr()
  assert "Mosaic GPU kernels need an NVIDIA Hopper GPU" in cap.err
  got = json.loads(out.read_text())
  assert got["meta"]["command"].startswith("python scripts/bench_gemm.py --model tiny")
  rows = got["rows"]
  assert [(r["shape"], r["m"], r["variant"]) for r in rows] == [
      ("qkv", 1, "xla"), ("qkv", 8, "xla"), ("down", 1, "xla"), ("down", 8, "xla")]
  for r in rows:
    assert r["us"] > 0 and r["tb_s"] > 0 and r["rel_err"] < 2e-2
  assert (rows[0]["k"], rows[0]["n"]) == (64, 128)  # tiny: hidden 64, (4 + 2 * 2) heads of 16
  assert "| qkv | 8 | " in cap.out and "| down | 1 | " in cap.out


def test_bench_gemm_report_of_a_sweep():
  from kvrm_jax.bench import gemm_bench
  plan = {"tile_k": 128, "n_sub": 2, "splits": 4, "stages": 6}
  rows = [{"shape": "qkv", "m": 8, "variant": "xla", "us": 25.7, "tb_s": 1.96},
          {"shape": "qkv", "m": 8, "variant": "skinny", "us": 34.5, "tb_s": 1.46, "plan": plan},
          {"shape": "qkv", "m": 8, "variant": "skinny-sweep", "us": 27.2, "tb_s": 1.85, "plan": dict(plan, n_sub=1)},
          {"shape": "qkv", "m": 8, "variant": "skinny-sweep", "us": 30.0, "tb_s": 1.6, "plan": plan},
          {"shape": "qkv", "m": 8, "variant": "skinny-sweep", "error": "ValueError: shared memory"},
          {"shape": "down", "m": 8, "variant": "xla", "error": "XlaRuntimeError: out of memory"},
          {"shape": "qkv", "m": 8, "variant": "jax-hopper", "us": 30.0, "tb_s": 1.68, "plan": {"tile_n": 128}},
          {"shape": "qkv", "m": 8, "variant": "jax-hopper", "us": 26.0, "tb_s": 1.94, "plan": {"tile_n": 64}},
          {"shape": "qkv", "m": 8, "variant": "jax-hopper", "error": "ValueError: smem"}]
  meta = {"date": "d", "device": "H100", "jax": "0.11", "model": "llama3-8b", "dtype": "bfloat16", "copy_tb_s": 2.9,
          "command": "python scripts/bench_gemm.py --sweep"}
  text = gemm_bench.report(rows, meta)
  assert ("| qkv | 8 | 25.7 (1.96, 68 %) | 34.5 (1.46, 50 %) | 26.0 (1.94, 67 %) | 27.2 (tile_k 128, n_sub 1, "
          "splits 4, stages 6) |") in text  # jax-hopper: its best configuration
  assert "| down | 8 | error | - | - | - |" in text


@pytest.mark.parametrize("argv,message", [
    (["--shapes", "qkv", "nope"], "unknown --shapes ['nope']"),
    (["--model", "nope"], "unknown model preset"),
    (["--rows", "0"], "--rows and --reps must be positive"),
    (["--variants", "skinny", "jax-hopper"], "the Mosaic GPU kernels need an NVIDIA Hopper GPU"),
])
def test_bench_gemm_bad_input_is_one_clear_line(argv, message, capsys):
  bench_gemm = load_script("bench_gemm")
  with pytest.raises(SystemExit) as e:
    bench_gemm.main(argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_bench_step_gemm_variants(tmp_path, capsys, monkeypatch):
  """--matmul xla skinny: a row each (the kernel's jnp twin standing in for it off a Hopper GPU)."""
  from kvrm_jax.step import gemm
  from pallas_kernels import skinny_matmul as sm
  monkeypatch.setattr(gemm, "kernel_available", lambda: True)
  monkeypatch.setattr(sm, "skinny_matmul_mgpu",
                      lambda x, w, plan=None, out_dtype=None: sm.reference(x, w, sm.choose_plan(
                          x.shape[0], x.shape[1], w.shape[1]), out_dtype))
  bench_step = load_script("bench_step")
  out = tmp_path / "s.json"
  assert bench_step.main(["--model", "tiny", "--dtype", "bfloat16", "--batches", "3", "--context", "32", "--warmup",
                          "1", "--iters", "2", "--matmul", "xla", "skinny", "--out-json", str(out)]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [r["matmul"] for r in rows] == ["xla", "skinny"]
  assert all("error" not in r and r["decode_compiles"] == 1 for r in rows)
  assert "| skinny | 3 | 32 |" in capsys.readouterr().out


def test_bench_gemm_jax_hopper_configs_lower_for_cuda(monkeypatch):
  """Each configuration of JAX's Hopper matmul that bench_gemm times builds its Mosaic GPU program
  for a decode-sized call (148 rows, padded) without a GPU."""
  import jax
  import jax.numpy as jnp
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
  from kvrm_jax.bench import gemm_bench
  monkeypatch.setattr(hm, "get_num_sms", lambda: 132)
  x = jax.ShapeDtypeStruct((148, 4096), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((4096, 28672), jnp.bfloat16)
  for cfg in gemm_bench.HOPPER_CONFIGS:
    text = jax.jit(lambda x, w: gemm_bench.hopper_matmul(x, w, cfg)).trace(x, w).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text, cfg


def test_bench_sampler_rows_and_same_tokens(tmp_path, capsys):
  """scripts/bench_sampler.py over SmolLM2's vocabulary (49,152 columns: the searches and the chunked
  top-k window run): a row per (setting, sampler), every branch-free `ways` drawing the branching
  sampler's tokens (exit status 0 only then); "window" not on k1000, which it refuses."""
  bench_sampler = load_script("bench_sampler")
  out = tmp_path / "s.json"
  assert bench_sampler.main(["--model", "smollm2-135m", "--rows", "3", "--settings", "p0.9", "k1000", "--ways", "2",
                             "16", "--calls", "1", "--reps", "1", "--out-json", str(out)]) == 0
  got = json.loads(out.read_text())
  assert got["meta"]["vocab"] == 49152 and got["meta"]["command"].startswith("python scripts/bench_sampler.py")
  rows = got["rows"]
  names = ("greedy-only", "branch", "branch-free (2-way)", "branch-free (16-way)", "window")
  assert [(r["setting"], r["sampler"]) for r in rows] == [(s, n) for s in ("p0.9", "k1000") for n in names
                                                          if (s, n) != ("k1000", "window")]  # window refuses k > 64
  assert all(r["ms"] > 0 for r in rows)
  assert [r["same_tokens"] for r in rows if r["sampler"].startswith("branch-free")] == [True] * 4
  assert [r["same_tokens"] for r in rows if r["sampler"] == "window"] == [None]  # top-p alone: another definition
  assert "| 3 | p0.9 | branch-free (2-way) |" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [(["--ways", "3"], "--ways must be powers of two >= 2, got [3]"),
                                          (["--rows", "0"], "--rows, --calls and --reps must be positive")])
def test_bench_sampler_bad_input_is_one_clear_line(argv, message, capsys):
  with pytest.raises(SystemExit):
    load_script("bench_sampler").main(argv)
  assert message in capsys.readouterr().err
