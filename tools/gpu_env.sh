# Sourced by the tools/gpu_*.sh device scripts: repo root, output folder ($OUT, default /tmp/$1),
# unbuffered Python, the extension's build folder, and $PY.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/$1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 EXLLAMA_EXT_DIR=${EXLLAMA_EXT_DIR:-/tmp/exllama_ext}
PY=${PYTHON:-python3}
