"""SIGTERM as a stop request (step3vl_train/train/preemption.py), in this process."""

import os
import signal
import time

import pytest

from step3vl_train.train.preemption import Preempted, StopRequest


def test_sigterm_is_recorded_once_and_the_previous_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest(grace_s=10)
    with stop.installed():
        assert not stop.requested and stop.save_fits(None)
        os.kill(os.getpid(), signal.SIGTERM)
        first = stop.received_at
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's forwarded copy after the scheduler's: the first counts
        assert stop.requested and stop.received_at == first
        assert stop.save_fits(None) and stop.save_fits(5) and not stop.save_fits(5, elapsed=6)
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_grace_running_out_abandons_what_the_main_thread_waits_on():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest(grace_s=0.3, abandon_at_deadline=True)
    started = time.monotonic()
    try:
        with pytest.raises(Preempted, match="preempt_grace_s=0.3 ran out"), stop.installed():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        assert 0.3 <= time.monotonic() - started < 10 and stop.abandoned
        # Stopped: SIGTERM is ignored from then on, so that another one does not cut the exit short.
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_ctrl_c_inside_is_still_ctrl_c():
    with pytest.raises(KeyboardInterrupt), StopRequest(grace_s=5, abandon_at_deadline=True).installed():
        raise KeyboardInterrupt
