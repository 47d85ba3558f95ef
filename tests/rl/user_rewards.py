"""Rewards named by import path in the tests: one that behaves, one that hangs, one that kills its process."""

import os
import time


def exact(request) -> float:
    return float(request.response.rpartition("</think>")[2].strip() == str(request.answer))


def hang(request) -> float:
    time.sleep(60)
    return 1.0


def crash(request) -> float:
    os._exit(3)


def out_of_range(request) -> float:
    return 2.0


def coin(request) -> float:
    """Half the responses score 1, by a property of their text: most groups are mixed."""
    return float(len(request.response) % 2)
