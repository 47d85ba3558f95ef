"""One run per output directory: a second run is refused naming the first, and a killed holder's lock is
taken over, across processes as across nodes (the lock is the kernel's, released with its process)."""

import logging
import os
import signal
import socket
import subprocess
import sys

import pytest

from step3vl_train.train.run_lock import LOCK_FILE, RunLock, read_holder
from step3vl_train.usage import UsageError

HOLD = """
import sys, time
from step3vl_train.train.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def holder(directory) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_is_refused_naming_the_first_and_a_killed_ones_lock_is_taken_over(tmp_path, caplog):
    first = holder(tmp_path)
    try:
        with pytest.raises(UsageError) as refused:
            RunLock(tmp_path).acquire()
        assert f"host {socket.gethostname()}, PID {first.pid}" in str(refused.value)
        assert str(tmp_path) in str(refused.value)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with caplog.at_level(logging.WARNING, logger="step3vl_train"), RunLock(tmp_path) as lock:
        assert read_holder(lock.fd)["pid"] == os.getpid()  # not a read of the file: closing it would unlock
    assert f"taking over the lock of a run that is gone (host {socket.gethostname()}, PID {first.pid}" in caplog.text
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released, not left behind


def test_a_released_lock_is_taken_without_a_warning(tmp_path, caplog):
    with RunLock(tmp_path / "run"):
        pass
    with caplog.at_level(logging.WARNING, logger="step3vl_train"), RunLock(tmp_path / "run"):
        pass
    assert "taking over" not in caplog.text
