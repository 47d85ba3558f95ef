#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels the GPU check needs beyond what the device image already has
# (/work/.library/device/KINDS.md: Python 3.12, torch 2.11, transformers 5.17, accelerate 1.15, ...).
# Run here, on the CPU machine with network, from the repo root:
#
#   bash benchmarks/gpu/fetch_wheels.sh
#
# On the device, before anything imports them:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#
# Left out on purpose: ray (its cp312 wheel alone is ~76 MiB, over the 64 MiB the working tree may carry;
# the check's RL iteration runs in one process, benchmarks/gpu/rl_iteration.py, and rl.workers.train,
# rl.sync and rl.iteration import no Ray), wandb (imported lazily, only when logging.mode is not
# `disabled`), datasets (only for HF `save_to_disk` sources), openai (the HTTP verifier; the device has
# no network), vllm (it pins torch 2.14). Everything else imported by launch/pretrain.py and by
# rl.workers.train / rl.engines.hf / rl.rewards is either below or already in the image.
set -euo pipefail

PY=${PY:-.venv/bin/python}  # the project's venv: torch importable when deepspeed's setup.py runs
OUT=.whl
LIMIT_MIB=56

# name==version, the versions the project's venv runs (checked against it below).
BINARY=(
    hydra-core==1.3.8               # launch/pretrain.py, rl/run.py: @hydra.main, ConfigStore
    omegaconf==2.3.1                # configs everywhere (step3vl_train.train.*, rl.config)
    transformers==5.20.2            # the image's 5.17.0 lacks configuration_utils.SubConfigSpec (model/config.py)
    hjson==3.1.0                    # deepspeed (module level)
    pydantic==2.14.4                # deepspeed's config classes (module level)
    pydantic_core==2.50.5           # pydantic (compiled, cp312)
    annotated-types==0.8.0          # pydantic
    typing-inspection==0.4.5        # pydantic
    typing_extensions==4.16.0       # pydantic 2.14.4 requires >=4.16.0; the image's version is not known
    torchdata==0.11.0               # step3vl_train/data/loader.py: StatefulDataLoader (module level)
    webdataset==1.0.2               # step3vl_train/data/shards.py (synthetic corpus), sources.py (urls)
    braceexpand==0.1.7              # step3vl_train/data/sources.py (module level); webdataset
    pebble==5.2.3                   # rl/rewards/scorer.py (module level)
    math-verify==0.9.0              # rl/rewards/verifiable.py: math rewards (imported when scoring)
    latex2sympy2_extended==1.11.0   # math-verify
)
# Published as sdists only: built here into pure-python wheels.
SDIST=(
    antlr4-python3-runtime==4.9.3   # omegaconf, hydra (grammar), latex2sympy2_extended[antlr4_9_3]
    deepspeed==0.19.8               # ZeRO-3 engine; DS_BUILD_OPS=0: no prebuilt ops, any op is JIT-built
)

for spec in "${BINARY[@]}" "${SDIST[@]}"; do
    name=${spec%%==*} want=${spec##*==}
    have=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || echo none)
    [[ $have == "$want" ]] || echo "note: the venv has $name $have, fetching $want" >&2
done

rm -rf "$OUT"
mkdir -p "$OUT"

"$PY" -m pip download -q --no-deps --no-cache-dir --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$OUT" "${BINARY[@]}"

# --no-cache-dir: a wheel cached by an earlier `pip install` may have been built with other DS_BUILD_* flags.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$OUT" "${SDIST[@]}"

# Every wheel must install on CPython 3.12 / x86-64 and the set must hold one version of each project.
fail=0
for whl in "$OUT"/*.whl; do
    tag=${whl##*/}
    case $tag in
        *-py3-none-any.whl | *-py2.py3-none-any.whl | *-cp312-cp312-*x86_64.whl | *-cp312-abi3-*x86_64.whl) ;;
        *) echo "error: $tag does not fit CPython 3.12 on x86-64" >&2; fail=1 ;;
    esac
done
dupes=$(for whl in "$OUT"/*.whl; do n=${whl##*/}; n=${n%%-*}; echo "${n,,}" | tr _. --; done | sort | uniq -d)
[[ -z $dupes ]] || { echo "error: more than one wheel of: $dupes" >&2; fail=1; }
# The deepspeed wheel must be pure python (no prebuilt ops to mismatch the device's torch/CUDA).
if unzip -l "$OUT"/deepspeed-*.whl | grep -qE '\.so$'; then
    echo "error: the deepspeed wheel holds compiled ops" >&2
    fail=1
fi
((fail == 0)) || exit 1

printf '%10s  %s\n' bytes wheel
for whl in "$OUT"/*.whl; do printf '%10d  %s\n' "$(stat -c %s "$whl")" "${whl##*/}"; done
total=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
count=$(ls "$OUT"/*.whl | wc -l)
awk -v t="$total" -v n="$count" 'BEGIN { printf "%d wheels, %d bytes = %.2f MiB in all\n", n, t, t / 1048576 }'
if ((total > LIMIT_MIB * 1024 * 1024)); then
    echo "error: the wheels exceed ${LIMIT_MIB} MiB" >&2
    exit 1
fi
