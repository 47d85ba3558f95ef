#!/usr/bin/env bash
# The GPU check, in one command on a machine with one GPU (the device tool's, or yours), repo root:
#
#   bash benchmarks/gpu/run.sh
#
# Installs the wheels in .whl/ (made on a machine with network by benchmarks/gpu/fetch_wheels.sh; the
# device carries them with `carry: [".whl"]`) into /tmp/site, then runs benchmarks/gpu/check.py into
# $OUT (the device tool's output folder) or outputs/gpu_check. About 6 minutes on one H100; the results
# are OUT/summary.md (BENCHMARKS.md's table), OUT/results.json and one log a stage.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/gpu_check}
PY=${PY:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
timeout 480 "$PY" benchmarks/gpu/check.py --out "$OUT" "$@"
