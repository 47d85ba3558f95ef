import logging

import pytest

from step3vl_train.data.skips import SkipLog, SkipRecord


def records(*keys, reason="corrupt_image"):
    return [SkipRecord("web", key, reason, "bad bytes") for key in keys]


def messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "step3vl_train.data"]


def test_a_key_is_logged_once_with_source_and_reason(caplog):
    log = SkipLog()
    with caplog.at_level(logging.WARNING):
        for skip in records("a.tar:k1", "a.tar:k2", "a.tar:k1", "a.tar:k1"):
            log.record(skip)
    assert messages(caplog) == [
        "skipped a.tar:k1 (corrupt_image, source web): bad bytes",
        "skipped a.tar:k2 (corrupt_image, source web): bad bytes",
    ]
    assert log.unique() == {"corrupt_image": 2}


def test_keys_over_the_rate_are_summed_by_reason_into_one_line(caplog):
    now = [0.0]
    log = SkipLog(lines_per_minute=3, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        for skip in records(*[f"k{i}" for i in range(5)]) + records("k5", reason="too_long"):
            log.record(skip)
        assert len(messages(caplog)) == 3  # k0..k2; k3, k4, k5 held back
        now[0] = 61.0
        log.record(records("k6")[0])
        log.flush()  # nothing is held any more
    lines = messages(caplog)
    assert len(lines) == 5
    assert lines[3] == (
        "... and 3 more skipped samples not logged one by one (at most 3 a minute): {'corrupt_image': 2, 'too_long': 1}"
    )
    assert lines[4].startswith("skipped k6 ")
    assert log.unique() == {"corrupt_image": 6, "too_long": 1}


@pytest.mark.parametrize("held", [True, False])
def test_flush_reports_only_what_was_held(caplog, held):
    log = SkipLog(lines_per_minute=1, clock=lambda: 0.0)
    with caplog.at_level(logging.WARNING):
        for skip in records("k0", "k1") if held else records("k0"):
            log.record(skip)
        log.flush()
    assert len(messages(caplog)) == (2 if held else 1)
