#!/usr/bin/env bash
# A/B on the device in one call: this tree against ab_base/ (a copy of the base commit's engine, git-ignored:
#   mkdir ab_base && git archive REV model cuda_ext tools benchmark.py | tar -x -C ab_base
# and carried to the device), each with its own extension build. Env: SHAPES (default "135m 7b"), TESTS (pytest -k filter; empty: skip), ATT=1 adds
# tools/bench_attention.py for every build, RUNS (benchmark repeats, default 2), PROFILE=1 a decode timeline per shape (new),
# BUILDS="name:-DFLAG[,-DFLAG2] ..." more builds of this tree (EXLLAMA_NVCC_FLAGS, own extension folder) benchmarked
# beside the two, KBENCH="cmd" a kernel benchmark run for every build (in its own folder), PHASE=build
# (builds, checkpoints, tests, attention) / bench (benchmarks) splits the work over two calls.
source "$(dirname "$0")/gpu_env.sh" ab_out
# Every build as name:folder:extension folder:flags: this tree, the base copy, then the flag builds of this tree.
ALL="new:.:$EXLLAMA_EXT_DIR: base:ab_base:/tmp/ext_base:"
for b in ${BUILDS:-}; do ALL="$ALL ${b%%:*}:.:/tmp/ext_${b%%:*}:${b#*:}"; done
# in_build SPEC CMD...: CMD in the build's folder with its extension. A flag build's runs pass its flags too:
# torch's loader rebuilds a folder whose flags differ from the caller's.
in_build() {
  local name dir ext flags
  IFS=: read -r name dir ext flags <<< "$1"; shift
  (cd "$dir" && EXLLAMA_EXT_DIR=$ext EXLLAMA_NVCC_FLAGS="$(echo "$flags" | tr , ' ')" "$@")
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/summary.txt"
for b in $ALL; do
  in_build "$b" $PY -c "from cuda_ext import build; build.load(); print('${b%%:*} ext ok')" 2>&1 | tail -1 &
done
wait
for s in ${SHAPES:-135m 7b}; do
  gs=128; [ $s = 135m ] && gs=32
  [ -d /tmp/rand_$s ] || $PY tools/make_random_gptq.py -o /tmp/rand_$s --shape $s --group-size $gs > /dev/null &
done
if [ "${PHASE:-all}" != bench ] && [ -n "${TESTS:-}" ]; then
  timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu_fused.py -k "$TESTS" 2>&1 \
    | tail -3 | tee -a "$OUT/summary.txt"
fi
wait
if [ "${ATT:-0}" = 1 ]; then
  for b in $ALL; do
    echo "== attention, ${b%%:*}" | tee -a "$OUT/summary.txt"
    in_build "$b" $PY tools/bench_attention.py 2>&1 | tee -a "$OUT/summary.txt"
  done
fi
if [ -n "${KBENCH:-}" ]; then          # a kernel benchmark command (each build's own tools/) for every build
  for b in $ALL; do
    echo "== $KBENCH: ${b%%:*}" | tee -a "$OUT/summary.txt"
    in_build "$b" $KBENCH 2>&1 | tail -4 | tee -a "$OUT/summary.txt"
  done
fi
[ "${PHASE:-all}" = build ] && exit 0
if [ "${PROFILE:-0}" = 1 ]; then
  for s in ${SHAPES:-135m 7b}; do
    echo "== decode timeline $s" | tee -a "$OUT/summary.txt"
    $PY tools/profile_decode.py -d /tmp/rand_$s --timeline --steps 20 --rows 12 2>&1 | grep -v Warn | tail -34 | tee -a "$OUT/summary.txt"
  done
fi
for s in ${SHAPES:-135m 7b}; do
  for r in $(seq ${RUNS:-2}); do
    for b in $ALL; do
      echo "== $s ${b%%:*}" | tee -a "$OUT/summary.txt"
      in_build "$b" $PY benchmark.py -p -d /tmp/rand_$s -l 2048 2>&1 | tail -1 | tee -a "$OUT/summary.txt"
    done
  done
done
