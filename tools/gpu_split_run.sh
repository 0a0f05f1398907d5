#!/usr/bin/env bash
# One device call on a machine with >= 2 GPUs (issue 9): random 13B and 70B GPTQ g128 checkpoints,
# the 13B split by hand against one GPU (greedy tokens must match), the 70B split with -gs auto
# through benchmark.py -p at 2k context (VRAM per device). Logs and a summary go to $OUT.
#   bash tools/gpu_split_run.sh [13b-split]      (default 13b split: 3.5,20 GB)
source "$(dirname "$0")/gpu_env.sh" gpu_split_out
SPLIT13=${1:-3.5,20}
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/summary.txt"
$PY -c "from cuda_ext import build; build.load(); print('extension ok')" 2>&1 | tail -1 | tee -a "$OUT/summary.txt"
for s in 13b 70b; do
  t0=$(date +%s)
  [ -d /tmp/rand_$s ] || $PY tools/make_random_gptq.py -o /tmp/rand_$s --shape $s > /dev/null
  echo "$s checkpoint written in $(( $(date +%s) - t0 )) s ($(du -sh /tmp/rand_$s | cut -f1))" | tee -a "$OUT/summary.txt"
done
echo "== 13b: manual split $SPLIT13 vs one GPU" | tee -a "$OUT/summary.txt"
timeout 300 $PY tools/split_check.py -d /tmp/rand_13b -gs "$SPLIT13" --tokens 64 2>&1 | tee "$OUT/split13.log" | tail -4 | tee -a "$OUT/summary.txt"
echo "== 13b: one GPU, benchmark" | tee -a "$OUT/summary.txt"
timeout 200 $PY benchmark.py -p -d /tmp/rand_13b -l 2048 --json 2>&1 | tail -4 | tee -a "$OUT/summary.txt"
echo "== 70b: -gs auto, benchmark at 2k" | tee -a "$OUT/summary.txt"
t0=$(date +%s)
timeout 400 $PY benchmark.py -p -d /tmp/rand_70b -l 2048 -gs auto --json 2>&1 | tee "$OUT/bench70.log" | grep -v "^\s*$" | tail -12 | tee -a "$OUT/summary.txt"
echo "70b run: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
