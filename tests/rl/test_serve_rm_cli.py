"""`python rl/serve_rm.py` as a user runs it: started, scoring, and stopped by SIGTERM as a scheduler stops it.
(Without a token it refuses to start: tests/rl/test_rm_service.py checks `read_token`'s messages.)"""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import requests

from step3vl_train.train.distributed import free_port
from tests.conftest import REPO

TOKEN = "cli-token-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def serve_rm(*overrides):
    # The replicas import the scripted backend (tests/rl/rm_stubs.py) from the repository.
    environment = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "STEP3VL_RM_TOKEN": TOKEN}
    command = [sys.executable, str(REPO / "rl" / "serve_rm.py"), *overrides]
    # A session of its own: what it leaves behind is found by its session id, and killed with it if a test fails.
    return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip


def wait_for(condition, what: str, process, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the service exited before {what}: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.2)


def health(url: str) -> int | None:
    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code
    except requests.RequestException:
        return None


def score(url: str, response: str) -> requests.Response:
    item = {"messages": [{"role": "user", "content": "Name a colour."}], "response": response}
    return requests.post(f"{url}/v1/score", json={"items": [item]}, headers=HEADERS, timeout=90)


def in_flight(url: str) -> int:
    return requests.get(f"{url}/v1/stats", headers=HEADERS, timeout=10).json()["in_flight"]


def running_in_session(session: int) -> list[str]:
    """The processes of a session still running (a zombie has exited: reaping it is its new parent's job)."""
    found = []
    for process in psutil.process_iter(["name", "status"]):
        try:
            if os.getsid(process.pid) == session and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{process.pid} {process.info['name']}")
        except (ProcessLookupError, PermissionError):
            pass
    return found


def test_sigterm_drains_the_request_in_flight_refuses_new_ones_and_leaves_no_process(tmp_path):
    port = free_port()
    url, release = f"http://127.0.0.1:{port}", tmp_path / "release"
    process = serve_rm("rm.backend=tests.rl.rm_stubs:ScriptedBackend", f"port={port}", "replica_cpus=0")
    try:
        wait_for(lambda: health(url) == 200, "the service came up", process)
        assert score(url, "Red.").json()["results"][0]["score"] == 0.8
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(score, url, f"wait:{release}")  # in flight until the file exists
            wait_for(lambda: in_flight(url) == 1, "the request was in flight", process, timeout_s=30)
            process.send_signal(signal.SIGTERM)
            wait_for(lambda: health(url) == 503, "the service drained", process, timeout_s=30)
            refused = score(url, "Red.")
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
            release.touch()
            reply = held.result(timeout=60)
        assert reply.status_code == 200 and reply.json()["results"][0]["status"] == "ok", reply.text
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, err[-3000:]
    assert "stopped: finished 1 request(s) in flight" in out and "Serve and Ray are shut down" in out, out
    left = running_in_session(process.pid)
    deadline = time.monotonic() + 10
    while left and time.monotonic() < deadline:  # wait_for_processes waits for Ray's own; their children follow
        time.sleep(0.5)
        left = running_in_session(process.pid)
    assert not left, left
