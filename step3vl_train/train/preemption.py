"""SIGTERM as a request to stop: schedulers and containers stop a job with it, and preemptible clusters leave
a grace period before SIGKILL.

The signal only sets a flag, which the loop reads at its next consistent point: the end of the training
step in flight (every rank agrees on the step through the step's own all-reduce, train/trainer.py) or of
the RL iteration in flight (rl/driver.py). There the run saves a checkpoint where one still fits in what is
left of `trainer.preempt_grace_s`, and raises `Preempted`, which the launch scripts report with the
checkpoint a re-run resumes from and exit code 143 (128 + SIGTERM, what a shell reports for a process the
signal ended). SIGINT (Ctrl-C) is not caught here: it stops the run at once (exit code 130).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_CODE = 128 + signal.SIGTERM


class Preempted(Exception):
    """The run stopped on SIGTERM at a consistent point; the message says where and whether it saved."""


class StopRequest:
    """Records the first SIGTERM this process receives, while `installed`.

    `abandon_at_deadline`: when the grace is up before the loop has stopped, the main thread is interrupted
    wherever it is, and the block `installed` raises `Preempted` (the RL driver, whose waits on Ray actors a
    signal can interrupt: Ray turns any exception the handler raises into a KeyboardInterrupt, hence that
    one); left false where stopping mid-step would leave other ranks in a collective (the training ranks).
    """

    def __init__(self, grace_s: float, abandon_at_deadline: bool = False):
        self.grace_s = grace_s
        self.abandon_at_deadline = abandon_at_deadline
        self.received_at: float | None = None
        self.abandoned = False
        self.timer: threading.Timer | None = None

    @property
    def requested(self) -> bool:
        return self.received_at is not None

    def elapsed(self) -> float:
        """Seconds since the signal (0 before one)."""
        return time.monotonic() - self.received_at if self.received_at is not None else 0.0

    def save_fits(self, save_s: float | None, elapsed: float | None = None) -> bool:
        """Whether a save of about `save_s` seconds (None: none timed yet, taken to fit) ends within the
        grace, `elapsed` seconds after the signal (default: this process's)."""
        elapsed = self.elapsed() if elapsed is None else elapsed
        return save_s is None or elapsed + save_s <= self.grace_s

    def handle(self, signum: int, frame) -> None:
        if self.received_at is None:
            self.received_at = time.monotonic()
            if self.abandon_at_deadline:
                main = threading.main_thread().ident
                self.timer = threading.Timer(self.grace_s, signal.pthread_kill, (main, signal.SIGTERM))
                self.timer.daemon = True
                self.timer.start()
        elif self.abandon_at_deadline and not self.abandoned and self.elapsed() >= self.grace_s:
            self.abandoned = True
            raise KeyboardInterrupt  # `installed` makes it `Preempted`

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """The handler for SIGTERM within the block (main thread only); the one before it afterwards, unless
        the block stops the run (`Preempted`): the process is then on its way out, and another SIGTERM (from
        torchrun, once another rank has exited) must not cut its exit short, so SIGTERM is ignored from then
        on (an ignored signal stays ignored through the interpreter's exit, where a handler would not)."""
        previous = signal.signal(signal.SIGTERM, self.handle)
        stopped = False
        try:
            yield self
        except KeyboardInterrupt:
            if not self.abandoned:
                raise  # Ctrl-C
            stopped = True
            message = f"stopped by SIGTERM: trainer.preempt_grace_s={self.grace_s:g} ran out before a consistent point"
            raise Preempted(message) from None
        except Preempted:
            stopped = True
            raise
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN if stopped else previous)
            if self.timer is not None:
                self.timer.cancel()
