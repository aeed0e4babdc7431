#!/usr/bin/env bash
# Every GPU measurement as one prepared script, for a lent GPU machine whose python3 has a
# CUDA torch: `bash bench/gpu_all.sh OUT_DIR [BEFORE_SERVICE_DIR]`.
# Wheels for what that python lacks (captum, pydantic, the pinned grpcio/protobuf, ...) are
# taken from .whl/ when present. BEFORE_SERVICE_DIR (an older checkout's service/) adds the
# engine throughput of that code, measured on the same machine for a same-run ratio.
set -u
out=${1:-bench/results}
before=${2:-}
mkdir -p "$out"
log="$out/gpu_all.log"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$log" 2>&1 || exit 1
fi
site=${PYTHONPATH:+:$PYTHONPATH}
[ -d /tmp/site ] && site=":/tmp/site$site"
export PYTHONPATH="$PWD/service:$PWD/clients/python:$PWD/bench$site" PYTHONUNBUFFERED=1
status=0
step() { echo "== $* ($(date +%T))" >>"$log"; "$@" >>"$log" 2>&1 || { echo "FAILED: $*" >>"$log"; status=1; }; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$log" 2>&1
step python3 bench/gpu_check.py "$out/gpu_check.json"
step python3 bench/gpu_precision.py "$out/gpu_precision.json"
BENCH_OUT=$out BENCH_CONFIGS=defaults step python3 bench/throughput.py --device cuda
if [ -n "$before" ]; then
  PYTHONPATH="$PWD/$before:$PWD/clients/python:$PWD/bench$site" \
    step python3 bench/gpu_check.py "$out/gpu_check_before.json" --throughput-only
fi
echo "== done ($(date +%T)) status $status" >>"$log"
exit $status
