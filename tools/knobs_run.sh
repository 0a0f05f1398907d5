#!/usr/bin/env bash
# One device call of env-knob A/Bs on the random checkpoints (after tools/ab_run.sh built both extensions on
# this machine, or building them here): KNOBS is a list of "NAME=VALUE" (or "default"), SHAPE the checkpoint.
source "$(dirname "$0")/gpu_env.sh" knobs_out
for k in ${KNOBS:-default}; do
  echo "== ${SHAPE:-135m} $k" | tee -a "$OUT/summary.txt"
  if [ "$k" = default ]; then env=(); else env=("$k"); fi
  env "${env[@]}" $PY benchmark.py -p -d /tmp/rand_${SHAPE:-135m} -l 2048 2>&1 | tail -1 | tee -a "$OUT/summary.txt"
done
