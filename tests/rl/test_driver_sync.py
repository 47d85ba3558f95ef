"""The driver around a weight sync, with fake actors (tests/rl/test_validation.py's): colocated engines sleep
after the rollout and wake in two steps around the sync, so the sync's buffers and the KV cache are never on
the GPU together; and a sync's failure is one message naming the engine."""

import rl.driver
from rl.driver import Driver
from tests.rl.test_validation import Actor, config, run_driver


def test_colocated_engines_wake_their_weights_for_the_sync_and_their_cache_after(tmp_path, monkeypatch):
    cfg = config(tmp_path, "trainer.max_steps=2", "trainer.save_every=2", "rollout=vllm", "rollout.colocate=true",
                 "trainer.num_gpus_per_rank=1", "processor.crop_rule=vllm", "rollout.n=2", "rollout.max_new_tokens=16",
                 "rollout.eval.n=4", "rollout.eval.max_new_tokens=12")  # fmt: skip
    events = [(kind, step, extra) for kind, step, extra, _ in run_driver(cfg, monkeypatch) if kind != "update"]
    for step in (1, 2):
        iteration = [(kind, extra) for kind, at, extra in events if at == step and kind != "save"]
        kinds = [kind for kind, _ in iteration]
        assert kinds == ["train", "sleep", "wake_up", "sync", "wake_up"], kinds
        assert [extra for kind, extra in iteration if kind == "wake_up"] == [["weights"], ["kv_cache"]]


class Engine:
    def __init__(self, failure):
        self.failure = failure

    def sync_failure(self):
        return self.failure


def fake_get(value, timeout=None):
    """A hung engine's answer never comes; a dead one's is an error."""
    if value == "hung":
        raise rl.driver.GetTimeoutError
    if value == "dead":
        raise rl.driver.RayActorError
    return value


def test_a_failed_sync_names_each_engine_and_what_became_of_it(tmp_path, monkeypatch):
    driver = Driver(config(tmp_path), {})
    driver.step = 7
    failures = [None, "update_weights: OutOfMemoryError: CUDA", "hung", "dead"]
    driver.engines, driver.engine_pids = [Actor(Engine(failure)) for failure in failures], [11, 12, 13, 14]
    monkeypatch.setattr(rl.driver.ray, "get", fake_get)
    assert driver.sync_failure("did not end within rollout.sync_timeout_s=600 s") == (
        "the weight sync after step 7 did not end within rollout.sync_timeout_s=600 s: rollout engine 1 (pid 12): "
        "update_weights: OutOfMemoryError: CUDA; rollout engine 2 (pid 13): does not answer (still in the update, "
        "or hung); rollout engine 3 (pid 14): has died"
    )
    driver.engines, driver.engine_pids = driver.engines[:1], [11]
    assert driver.sync_failure("failed").endswith("failed: no rollout engine reported a failure")
