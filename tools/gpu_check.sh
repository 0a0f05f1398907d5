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
    | awk '/Function : /{f=($0 ~ /ILi1ELi4ELi0ELi3ELi2E/)} f' > /tmp/m1.sass
  echo "instruction mix, M=1 reg4i kernel (default):"
  grep -oE '^\s+/\*[0-9a-f]{4}\*/\s+[A-Z][A-Z0-9_.]*' /tmp/m1.sass | awk '{print $2}' | sort | uniq -c | sort -rn | head -40
} > "$OUT/sass.txt" 2>&1

if [ "${GPU_CHECK_DIAG:-0}" = "1" ]; then
echo "== diag (C++ exceptions across the extension boundary)"
cat > /tmp/bad_args.py <<'PY'
import sys, torch
sys.path.insert(0, ".")
from cuda_ext import ops
from model.quant import pack_int4
qw = pack_int4(torch.randint(0, 16, (576, 192), device="cuda"))
sc = torch.rand(18, 192, device="cuda").half()
try:
    ops.q4_gemm_small(torch.randn(9, 576, device="cuda").half(), qw, sc, sc)
except RuntimeError as e:
    print("caught:", str(e).splitlines()[0])
PY
cat > /tmp/probe.py <<'PY'
import sys
from torch.utils.cpp_extension import load_inline
src = """
#include <torch/extension.h>
void boom_check() { TORCH_CHECK(false, "probe TORCH_CHECK"); }
void boom_std() { throw std::runtime_error("probe std::runtime_error"); }
"""
m = load_inline(name="exc_probe", cpp_sources=src, functions=["boom_check", "boom_std"],
                build_directory="/tmp/probe", verbose=False)
for f in (m.boom_std, m.boom_check):
    try:
        f()
    except Exception as e:
        print(type(e).__name__, "caught:", str(e).splitlines()[0], flush=True)
PY
mkdir -p /tmp/probe
{
  echo "-- compilers"; which c++ g++; c++ --version | head -1
  $PY -c "import torch; print(torch.__config__.show())" | grep -i -E "gcc|compiler|abi" | head -6
  ldd "$EXLLAMA_EXT_DIR/exllama_ext.so" | grep -E "stdc|gcc_s|torch_python"
  echo "-- this extension, bad args"; timeout 120 $PY /tmp/bad_args.py; echo "rc=$?"
  echo "-- minimal inline extension"; timeout 200 $PY /tmp/probe.py; echo "rc=$?"
  echo "-- cuda-gdb backtrace of the bad-args run"
  timeout 200 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex bt --args $PY /tmp/bad_args.py 2>&1 | grep -v "^\[New Thread\|^\[Thread" | tail -45
} > "$OUT/diag.txt" 2>&1
cat "$OUT/diag.txt" | head -80
fi

echo "== tests"
timeout 240 $PY -m pytest tests/test_kernels.py -q -rs --maxfail=25 > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"
tail -30 "$OUT/pytest.log"

echo "== bench"
timeout 300 $PY tools/bench_kernels.py --json "$OUT/bench.json" "$@" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
tail -40 "$OUT/bench.log"
