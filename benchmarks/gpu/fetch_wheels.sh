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
# no network), vllm (it pins torch 2.14), filelock (transformers checks it at import, but with no version
# bound: the image's passes). Everything else imported by launch/pretrain.py and by rl.workers.train /
# rl.engines.hf / rl.rewards is either below or already in the image. Below, the script checks that
# transformers' import-time version checks will pass on the device, and notes any requirement of a
# wheel here that neither the wheels nor the image's known versions meet.
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
    # transformers checks these at import (dependency_versions_check.py) and stops if one is too old; the
    # image has them at versions not known here, so the venv's go along:
    regex==2026.12.2                # regex>=2025.10.22: the bound that an older image would miss (cp312)
    tqdm==4.70.1                    # tqdm>=4.60; deepspeed imports it too
    packaging==26.4                 # packaging>=20.0; deepspeed (>=20.0) and hydra too
    PyYAML==6.0.4                   # pyyaml>=5.1; omegaconf (>=5.1.0) and webdataset too (cp312)
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
# What the wheels need on the device. transformers stops at import when a package it checks there
# (dependency_versions_check.py) is missing or too old: each such requirement must be met by a wheel here
# or by a version the image is known to have (an error otherwise). Every wheel's other requirements are
# looked up the same way; pip's metadata is not checked at import, so one not known to be met is a note.
"$PY" - "$OUT" <<'PYTHON' || fail=1
import ast
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

# The device image (/work/.library/device/KINDS.md): versions seen there, and packages listed without one.
IMAGE_VERSIONS = {"python": "3.12.3", "torch": "2.11.0", "transformers": "5.17.0", "accelerate": "1.15.0",
                  "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0", "tokenizers": "0.23.2"}
IMAGE_PACKAGES = {"einops", "filelock", "jinja2", "msgpack", "ninja", "packaging", "pillow", "psutil", "py-cpuinfo",
                  "pyyaml", "regex", "requests", "sympy", "tqdm", "typer", "typing-extensions", "urllib3"}
DEVICE = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": ""}

wheels = {parse_wheel_filename(path.name)[0]: path for path in Path(sys.argv[1]).glob("*.whl")}
versions = {name: str(parse_wheel_filename(path.name)[1]) for name, path in wheels.items()}
known = IMAGE_VERSIONS | versions


def unmet(text):
    """Why a requirement may not be met on the device, or None."""
    requirement = Requirement(text)
    name = canonicalize_name(requirement.name)
    if requirement.marker is not None and not requirement.marker.evaluate(DEVICE):
        return None
    if name in known:
        ok = requirement.specifier.contains(known[name], prereleases=True)
        return None if ok else f"{text}: {'carried' if name in versions else 'the image has'} {known[name]}"
    if name in IMAGE_PACKAGES:
        return None if not requirement.specifier else f"{text}: the image's version is not known"
    return f"{text}: neither carried nor in the image"


def read(wheel, member):
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member).decode()


source = read(wheels["transformers"], "transformers/dependency_versions_check.py")
checked = next(ast.literal_eval(node.value) for node in ast.parse(source).body
               if isinstance(node, ast.Assign) and node.targets[0].id == "pkgs_to_check_at_runtime")
table = {}
exec(read(wheels["transformers"], "transformers/dependency_versions_table.py"), table)
errors = [problem for package in checked if (problem := unmet(table["deps"][package]))]
for problem in errors:
    print(f"error: transformers checks at import {problem}", file=sys.stderr)
print(f"transformers {versions['transformers']} checks at import: " + ", ".join(table["deps"][p] for p in checked))

for name, wheel in sorted(wheels.items()):
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(member for member in archive.namelist() if member.endswith(".dist-info/METADATA"))
    for text in Parser().parsestr(read(wheel, metadata)).get_all("Requires-Dist") or []:
        if problem := unmet(text):
            print(f"note: {name} requires {problem}", file=sys.stderr)
sys.exit(1 if errors else 0)
PYTHON
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
