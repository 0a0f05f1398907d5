#!/usr/bin/env bash
# One device call for decode diagnostics: 13B split check, decode-step kernel profile (7B), ncu of the 7B GEMVs.
source "$(dirname "$0")/gpu_env.sh" gpu_diag_out
$PY -c "from cuda_ext import build; build.load()" || exit 1
rm -rf /tmp/rand_13b; $PY tools/make_random_gptq.py -o /tmp/rand_13b --shape 13b >/dev/null
$PY tools/make_random_gptq.py -o /tmp/rand_7b --shape 7b >/dev/null
echo "== 13b split"; timeout 200 $PY tools/split_check.py -d /tmp/rand_13b -gs 3.5,20 --tokens 64 2>&1 | tail -4
echo "== profile graph"; timeout 120 $PY tools/profile_decode.py -d /tmp/rand_7b --context 100 2>&1 | tail -22
echo "== profile graph ctx 1900"; timeout 120 $PY tools/profile_decode.py -d /tmp/rand_7b --context 1900 --rows 8 2>&1 | tail -10
echo "== ncu"; timeout 200 ncu --clock-control none --kernel-name regex:q4_gemm --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section LaunchStats $PY tools/ncu_q4.py > $OUT/ncu.txt 2>&1; echo "ncu rc=$?"
grep -E "q4_gemm_small_kernel|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Issue Slots|No Eligible|Warp Cycles Per Issued|Stall|Block Limit Reg|Grid Size" $OUT/ncu.txt | head -80
