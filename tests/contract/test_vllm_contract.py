"""The rollout engine's contract with vLLM 0.33, checked against vLLM's own code on the CPU.

vLLM needs CUDA torch to run, but its config, processor, model-registry, model-class and weight-transfer
modules import on CPU torch when vLLM is installed without its dependencies. That environment lives beside
the project's venv (`<venv>/vllm-contract`, a `pip install --target` of requirements.txt: about 440 MB to
download, 1 GB on disk, 20 s to install, made once and reused until requirements.txt changes). The checks
themselves are in the `vllm_*side.py` files (vllm_side.py: config, prompts, weight names, transfer ranks;
vllm_sync_side.py: the weight sync; vllm_model_side.py: vLLM's model class run on the CPU;
vllm_partial_side.py: partial rollouts through vLLM's engine front end), run there in one pytest process; each
test here reports one letter of them.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ENVIRONMENT = Path(sys.prefix) / "vllm-contract"
CHECKS = {
    "a": "an export's config loads through vLLM's config path as STEP3-VL",
    "b": "vLLM's processor expands prompts to our token ids",
    "c": "every exported tensor maps onto vLLM's model",
    "d": "the NCCL transfer ranks for N engines x TP are vLLM's valid layout",
    "e": "an IPC update built by our sender crosses vLLM's msgpack encoder to the engine core",
    "f": "vLLM's packed IPC producer takes every 10B tensor in our buffer",
    "g": "vLLM's layerwise reload applies a trainable-only update and keeps the frozen tower",
    "h": "a freeze that splits a module vLLM loads whole is refused; our module grouping is vLLM's",
    "i": "vLLM's own model class runs on the CPU against ours",
    "j": "partial rollouts: paused rows continue, stream and abort through vLLM's engine front end",
}


def contract_environment() -> Path:
    """`ENVIRONMENT`, installed if missing or made from another requirements.txt or sitecustomize.py."""
    stamp = hashlib.sha256(b"".join((HERE / f).read_bytes() for f in ("requirements.txt", "sitecustomize.py")))
    stamp_file = ENVIRONMENT / ".stamp"
    if stamp_file.exists() and stamp_file.read_text() == stamp.hexdigest():
        return ENVIRONMENT
    shutil.rmtree(ENVIRONMENT, ignore_errors=True)
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(ENVIRONMENT)]
    subprocess.run([*install, "-r", str(HERE / "requirements.txt")], check=True)
    shutil.copy(HERE / "sitecustomize.py", ENVIRONMENT)
    stamp_file.write_text(stamp.hexdigest())
    return ENVIRONMENT


@pytest.fixture(scope="module")
def contract_results(tmp_path_factory) -> tuple[dict[str, str | None], str]:
    """(test name -> failure text, or None where it passed; the run's output)."""
    environment = contract_environment()
    report = tmp_path_factory.mktemp("contract") / "report.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(environment), str(REPO)]), "VLLM_TARGET_DEVICE": "cpu"}
    sides = [str(path) for path in sorted(HERE.glob("vllm_*side.py"))]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *sides]
    done = subprocess.run(
        [*command, f"--junitxml={report}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    output = (done.stdout + done.stderr)[-8000:]
    if not report.exists():
        pytest.fail(f"the contract run produced no report (exit {done.returncode}):\n{output}")
    results = {}
    for case in ElementTree.parse(report).iter("testcase"):
        problems = [case.find(kind) for kind in ("failure", "error", "skipped")]
        problem = next((found for found in problems if found is not None), None)
        results[case.get("name")] = None if problem is None else (problem.get("message") or "") + (problem.text or "")
    return results, output


@pytest.mark.slow
@pytest.mark.parametrize("check", sorted(CHECKS), ids=[f"{k}: {v}" for k, v in sorted(CHECKS.items())])
def test_vllm_contract(check, contract_results):
    results, output = contract_results
    mine = {name: problem for name, problem in results.items() if name.startswith(f"test_{check}_")}
    assert mine, f"no ({check}) check ran:\n{output}"
    failed = {name: problem for name, problem in mine.items() if problem is not None}
    assert not failed, "\n\n".join(f"{name}:\n{problem[-3000:]}" for name, problem in failed.items())
