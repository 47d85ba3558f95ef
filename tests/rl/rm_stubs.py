"""Reward-service backends for tests, selected as `rm.backend=tests.rl.rm_stubs:ScriptedBackend`: each item's
response says what the backend does with it."""

from __future__ import annotations

import time
from pathlib import Path

from rl.rm_service.items import ItemScore, ScoreItem

RELEASE_WAIT_S = 60  # the longest a `wait:PATH` item holds its batch


class ScriptedBackend:
    """A batch holding `sleep:S` items takes the longest S seconds, as one forward would; one holding a
    `wait:PATH` item runs until the file PATH exists (another process's request held in flight for as long as
    a test needs); `crash` raises (the whole batch); every item scores `preference` (default 0.8). Each
    batch's size is in the components."""

    needs_reference = False

    def __init__(self, preference: float = 0.8):
        self.preference = preference

    def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        if any(item.response == "crash" for item in items):
            raise RuntimeError("the backend crashed")
        time.sleep(
            max((float(i.response.removeprefix("sleep:")) for i in items if i.response.startswith("sleep:")), default=0)
        )
        for release in (Path(i.response.removeprefix("wait:")) for i in items if i.response.startswith("wait:")):
            deadline = time.monotonic() + RELEASE_WAIT_S
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return [ItemScore(self.preference, components={"rm": self.preference, "batch": len(items)}) for _ in items]
