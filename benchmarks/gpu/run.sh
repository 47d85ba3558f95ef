#!/usr/bin/env bash
# The GPU check, in one command on a machine with one GPU (the device tool's, or yours), repo root:
#
#   bash benchmarks/gpu/run.sh [check.py options, e.g. --budget sft_32k=150]
#
# Installs the wheels in .whl/ (made on a machine with network by benchmarks/gpu/fetch_wheels.sh; the
# device carries them with `carry: [".whl"]`) into /tmp/site, then runs benchmarks/gpu/check.py into
# $OUT (the device tool's output folder) or outputs/gpu_check. About 7.5 minutes on one H100 (a guess: no
# GPU has run it yet): setup, then four stages under their own budgets (check.py's GPU_BUDGETS_S, 400 s in
# all). The results are OUT/summary.md (BENCHMARKS.md's table), OUT/results.json and one log a stage;
# check.py rewrites the first two after every stage.
#
# CHECK_LIMIT_S (default 465) is a backstop for the whole script, setup included: when it runs out,
# check.py gets SIGTERM, stops the running stage, records it and the stages left, and writes the
# results; what it wrote before stays either way. Give the device tool a timeout_s above it (600).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/gpu_check}
PY=${PY:-python3}
CHECK_LIMIT_S=${CHECK_LIMIT_S:-465}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
left=$((CHECK_LIMIT_S - SECONDS))
((left > 0)) || { echo "error: the setup took ${SECONDS} s, CHECK_LIMIT_S=${CHECK_LIMIT_S} left none" >&2; exit 1; }
echo "setup took ${SECONDS} s; the check has ${left} s"
timeout --signal=TERM --kill-after=20 "$left" "$PY" benchmarks/gpu/check.py --out "$OUT" "$@"
