#!/usr/bin/env bash
# One device call: build the CUDA extension, run its tests, time the kernels. Logs go to $OUT.
#   bash tools/gpu_check.sh [bench args...]      (e.g. --sweep)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export EXLLAMA_EXT_DIR=${EXLLAMA_EXT_DIR:-/tmp/exllama_ext}
PY=${PYTHON:-python3}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
  nvcc --version | tail -1
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== build"
start=$(date +%s)
timeout 300 $PY -c "from cuda_ext import build; build.load(verbose=True); print('built in', build.build_dir())" > "$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - start )) s"
tail -5 "$OUT/build.log"
if [ $rc -ne 0 ]; then
  grep -E "error|Error" "$OUT/build.log" | head -40
  exit 1
fi

# Registers, spills and the inner-loop instruction mix of the M=1 kernel, from the compiled objects.
{
  for o in "$EXLLAMA_EXT_DIR"/q4_gemm_m1.cuda.o "$EXLLAMA_EXT_DIR"/q4_gemm_m4_5.cuda.o; do
    cuobjdump --dump-resource-usage "$o" 2>&1 | grep -E "Function|REG" | sed 's/^ *//'
  done
  cuobjdump -sass "$EXLLAMA_EXT_DIR"/q4_gemm_m1.cuda.o 2>/dev/null \
    | awk '/Function : .*ILi1ELi8ELb1ELi0E/{f=1} /Function : .*ILi1ELi8ELb1ELi1E/{f=0} f' > /tmp/m1.sass
  echo "instruction mix, M=1 u8-pipe kernel:"
  grep -oE '^\s+/\*[0-9a-f]{4}\*/\s+[A-Z][A-Z0-9_.]*' /tmp/m1.sass | awk '{print $2}' | sort | uniq -c | sort -rn | head -40
} > "$OUT/sass.txt" 2>&1

echo "== tests"
timeout 240 $PY -m pytest tests/test_kernels.py -q -rs --maxfail=25 > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"
tail -30 "$OUT/pytest.log"

echo "== bench"
timeout 300 $PY tools/bench_kernels.py --json "$OUT/bench.json" "$@" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
tail -40 "$OUT/bench.log"
