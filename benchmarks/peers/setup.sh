#!/usr/bin/env bash
# Builds .venv-peers (git-ignored) for benchmarks/peers_cpu.py: the libraries of the project's .venv at
# the same versions (CPU torch first, as the Makefile does), plus TRL and py-spy (requirements.txt). The
# project itself is not installed there: the peers' side reads our tokenizer, data and reward from files.
#
# bash benchmarks/peers/setup.sh     (from anywhere; the project's .venv must exist: make install)
set -euo pipefail
cd "$(dirname "$0")/../.."
MAIN=${MAIN_VENV:-.venv}
PEERS=${PEERS_VENV:-.venv-peers}
PYTHON=${PYTHON:-python3}
version() { "$MAIN/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pip_quiet() { "$PEERS/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
pins=("torch==$(version torch | cut -d+ -f1)")
for name in transformers deepspeed accelerate datasets tokenizers safetensors; do
  pins+=("$name==$(version "$name")")
done
test -x "$PEERS/bin/python" || "$PYTHON" -m venv "$PEERS"
pip_quiet "${pins[0]}"  # alone first: the CPU wheel (on disk or the index), never a CUDA build pulled by a dependency
pip_quiet "${pins[@]}" -r benchmarks/peers/requirements.txt
"$PEERS/bin/python" -c "import importlib.metadata as m; print('.venv-peers:', *(f'{n} {m.version(n)}' for n in ('trl', 'transformers', 'deepspeed', 'accelerate', 'torch', 'py-spy')))"
