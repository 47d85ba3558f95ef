"""One run per output directory: a lock its first process holds for the run's life.

The lock is a POSIX record lock (`fcntl.lockf`) on `<dir>/run.lock`, which also holds its holder's host,
PID and command. The kernel releases a record lock when its process ends however it ends, and NFS
forwards record locks to the server, so the lock works across the nodes of a shared filesystem and
outlives neither a kill nor a crash. (The `filelock` package uses `flock`, and falls back to a lock
file's mere existence where `flock` is missing, which a kill would leave behind.) A lock file whose
holder is gone is taken over, and its last holder logged. A record lock belongs to its process and ends
when that process closes any descriptor of the file: nothing else in the process opens `run.lock`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from step3vl_train.usage import UsageError

logger = logging.getLogger("step3vl_train")
LOCK_FILE = "run.lock"


class RunLock:
    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        """Takes the lock, or raises a UsageError naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = read_holder(fd)
            os.close(fd)
            raise UsageError(
                f"{self.path.parent} is in use by another run ({describe(holder)}): wait for it to end or stop it, "
                "or give this run another output directory"
            ) from None
        previous = read_holder(fd)
        if previous:
            logger.warning("%s: taking over the lock of a run that is gone (%s)", self.path, describe(previous))
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "command": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        """Empties the file (a lock found empty was released, not left by a kill) and unlocks it."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing releases the record lock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_holder(fd: int) -> dict:
    """The holder the lock file names; {} for an empty (released) or unreadable one."""
    try:
        return json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except ValueError:
        return {}


def describe(holder: dict) -> str:
    if not holder:
        return "its holder is unknown"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"host {holder.get('host')}, PID {holder.get('pid')}, since {since}: {' '.join(holder.get('command', []))}"


def lock_on_rank_zero(directory: Path) -> RunLock | None:
    """A distributed run's lock, held by rank 0; every rank raises rank 0's refusal. Collective."""
    import torch.distributed as dist

    lock, refusal = None, [None]
    if dist.get_rank() == 0:
        try:
            lock = RunLock(directory).acquire()
        except UsageError as error:
            refusal = [str(error)]
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise UsageError(refusal[0])
    return lock
