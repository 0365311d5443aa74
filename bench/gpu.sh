#!/usr/bin/env bash
# The GPU check in one command: the GPU tests (`pytest -m gpu`), then the training throughput of the
# three models (bench/gpu_bench.py) into bench/results/gpu.md. Needs Python with torch, numpy, scipy and
# pytest only; installs nothing and reaches no network.
#
#   bench/gpu.sh              the full measurements (<= 8 minutes on one H200)
#   bench/gpu.sh --quick      Norman-size screens only (<= 2 minutes)
#   bench/gpu.sh --smoke --output /tmp/gpu.md
#                             on a machine without CUDA: the tests skip, a CPU-sized bench runs (make test)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 || command -v python )}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
mode=full
output=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) mode=quick ;;
    --smoke) mode=smoke ;;
    --output) output=(--output "$2"); shift ;;
    *) echo "bench/gpu.sh: unknown argument $1 (--quick, --smoke, --output FILE)" >&2; exit 2 ;;
  esac
  shift
done
echo "== GPU tests ($("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA: they skip")'))"
"$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/gpu
echo "== throughput ($mode)"
"$PYTHON" bench/gpu_bench.py --mode "$mode" "${output[@]}"
