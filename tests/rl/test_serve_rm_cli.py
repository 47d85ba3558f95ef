"""`python rl/serve_rm.py` as a user runs it: started, scoring, and stopped by Ctrl-C. (Without a token it refuses
to start: tests/rl/test_rm_service.py checks `read_token`'s messages.)"""

import os
import signal
import subprocess
import sys
import time

import requests

from step3vl_train.train.distributed import free_port
from tests.conftest import REPO

TOKEN = "cli-token-0123456789abcdef"


def serve_rm(*overrides, token=None):
    environment = {k: v for k, v in os.environ.items() if k != "STEP3VL_RM_TOKEN"} | {"OMP_NUM_THREADS": "1"}
    if token:
        environment["STEP3VL_RM_TOKEN"] = token
    command = [sys.executable, str(REPO / "rl" / "serve_rm.py"), *overrides]
    # Ctrl-C works even where pytest was started with SIGINT ignored (a background job)
    return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def test_it_serves_until_ctrl_c(tiny_reward_model):
    port = free_port()
    process = serve_rm(f"rm.scalar.model={tiny_reward_model}", "rm.scalar.processor=configs/processor/tiny.yaml",
                       f"port={port}", "replica_cpus=0", token=TOKEN)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stderr.read()[-3000:]
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the service did not come up"
            time.sleep(1)
        item = {"messages": [{"role": "user", "content": "Name a colour."}], "response": "<think>hm</think>Red."}
        reply = requests.post(f"{url}/v1/score", json={"items": [item]}, headers={"Authorization": f"Bearer {TOKEN}"},
                              timeout=60)  # fmt: skip
        assert reply.status_code == 200, reply.text
        (result,) = reply.json()["results"]
        assert result["status"] == "ok" and 0 < result["score"] < 1 and "rm/raw" in result["components"]
    finally:
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in err
