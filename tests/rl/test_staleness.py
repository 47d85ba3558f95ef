"""algo.max_staleness and rollout.partial (rl/producer.py) through the driver's loop with fake actors (no Ray,
tests/rl/test_validation.py's): generation overlaps the update, every token carries the version that sampled
it, tokens older than k stay out of the losses, and a driver killed at any of three points (generating a
batch while another is buffered, in an update, in a save) resumes to train exactly the prompts an unkilled
run trains, in the same order, with every metrics row written once."""

import threading
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from rl.experience import Completion, Response
from rl.producer import RolloutProducer
from rl.prompts import prompt_loader
from rl.staleness import mark_ages, staleness_metrics
from step3vl_train.train.metrics import read_jsonl
from tests.rl.test_engines import image_prompt
from tests.rl.test_validation import Actor, FakeEngine, FakeWorker, Killed, config, run_with_fake_actors


def batch_of(seed: int) -> int:
    """The step a training call's seed belongs to (rl/producer.py: (step x 1000 + call) x 97 + engine)."""
    return seed // 97 // 1000


class Engine(FakeEngine):
    """FakeEngine's answers; records each training batch it is asked for. Under rollout.partial each call
    writes at most QUANTUM tokens of a row, the rest left "paused" (as a weight sync would leave them); a
    response to prompt `secret-N` is 2 + 5 x (N mod 3) filler tokens, then `\\boxed{j}` for its j-th response."""

    QUANTUM = 4

    def __init__(self, driver, events, tokenizer, shared):
        super().__init__(driver, events, tokenizer)
        self.shared = shared
        self.filler = tokenizer.encode(" so")

    def generate(self, prompts, sampling, seed):
        if seed >= 0:
            self.shared.asked(batch_of(seed))
        return super().generate(prompts, sampling, seed)

    def generate_rows(self, rows, sampling, seed, groups, enough):
        self.shared.asked(batch_of(seed))
        out, seen = [], Counter()
        for prompt, prefix in rows:  # a group's rows finish together: all of them are here, in order
            number, seen[prompt.key] = int(prompt.key[-6:]), seen[prompt.key] + 1
            answer = self.tokenizer.encode(f"I pick one.</think>\\boxed{{{seen[prompt.key] - 1}}}")
            full = self.filler * (2 + 5 * (number % 3)) + answer + [self.tokenizer.convert_tokens_to_ids("<|im_end|>")]
            done = len(prefix.token_ids) if prefix else 0
            ids = full[: done + self.QUANTUM]
            out.append(Completion(ids, [0.0] * len(ids), "stop" if len(ids) == len(full) else "paused"))
        return out, 0.0

    def pause_generation(self):
        pass

    def resume_generation(self):
        pass


class Worker(FakeWorker):
    """FakeWorker, whose update of step s first waits (up to 10 s) until the producer has made batch s + 1:
    with k >= 1 it is made during the update, so the wait ends at once; and the run's course does not
    depend on the threads' timing. Kills the driver where `shared.kill` says, once."""

    def __init__(self, driver, events, shared):
        super().__init__(driver, events, None)
        self.shared = shared

    def update(self, responses, counts):
        step = self.driver.step
        self.shared.maybe_kill("update", step)
        if self is self.driver.workers[0].target:
            self.events.append(("trained", step, responses, counts))
        if step < self.driver.cfg.trainer.max_steps and self.driver.cfg.algo.max_staleness:
            assert self.shared.wait_for_batch(step + 1), f"batch {step + 1} was not made during update {step}"
        return super().update(responses, counts)

    def save(self, path):
        self.shared.maybe_kill("save", self.driver.step)
        super().save(path)


class Shared:
    """What the fake actors of one driver run share: the batches asked of the engine, and the kill."""

    def __init__(self, kill):
        self.kill, self.batches, self.condition = kill, [], threading.Condition()

    def asked(self, step):
        self.maybe_kill("generate", step)
        with self.condition:
            self.batches.append(step)
            self.condition.notify_all()

    def wait_for_batch(self, step):
        producer = self.driver.producer
        with producer.condition:
            made = lambda: producer.error or any(b.step == step for b in producer.ready)  # noqa: E731
            return producer.condition.wait_for(made, timeout=10)

    def maybe_kill(self, where, step):
        if self.kill == (where, step):
            self.kill = None
            raise Killed


def run_driver(cfg, monkeypatch, kill=None):
    """`Driver.run` with the fake actors; `kill` = (where, step): "generate", "update" or "save". Returns
    what was trained, step by step, and the batches the engine was asked for."""
    events, shared = [], Shared(kill)

    def start_actors(driver):
        shared.driver = driver
        driver.workers = [Actor(Worker(driver, events, shared)) for _ in range(cfg.trainer.world_size)]
        driver.engines = [Actor(Engine(driver, events, driver.processor.tokenizer, shared))]

    run_with_fake_actors(cfg, monkeypatch, start_actors, killed=kill is not None)
    return [e for e in events if e[0] == "trained"], shared.batches


def trained_course(out):
    """(step, prompt key) of every trained group, and each metrics row without its timings."""
    rolled = [(row["step"], row["key"].split(":")[-1]) for row in read_jsonl(out / "rollouts.jsonl")]
    rows = [{k: v for k, v in row.items() if not k.startswith("time/")} for row in read_jsonl(out / "metrics.jsonl")]
    return rolled, rows


def test_one_step_stale_rollouts_are_made_during_the_update_and_carry_their_version(tmp_path, monkeypatch):
    cfg = config(tmp_path, "trainer.max_steps=4", "trainer.save_every=10", "algo.max_staleness=1")
    trained, asked = run_driver(cfg, monkeypatch)
    assert asked == [1, 2, 3, 4]  # each batch once, the next one during each update (Worker.update)
    # batch 1 by version 0; batch t >= 2 during update t - 1, by version t - 2, trained by version t - 1
    versions = [{v for r in responses for v, _ in r.completion.versions} for _, _, responses, _ in trained]
    assert versions == [{0}, {0}, {1}, {2}]
    # from step 2 every token is one version behind the trained policy: PPO's ratio takes it against the engine
    behind = [{r.behind == r.length for r in responses} for _, _, responses, _ in trained]
    assert behind == [{False}, {True}, {True}, {True}] and all(r.stale == 0 for *_, rs, _ in trained for r in rs)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [row["staleness/max"] for row in rows] == [0, 1, 1, 1]
    assert rows[0]["staleness/age_0"] == 1.0 and all(row["staleness/age_1"] == 1.0 for row in rows[1:])
    assert all(row["staleness/left_out"] == 0.0 for row in rows)


def test_without_staleness_the_update_waits_for_no_batch(tmp_path, monkeypatch):
    """k = 0: the synchronous loop, each batch asked for after the previous update and sync."""
    cfg = config(tmp_path, "trainer.max_steps=3", "trainer.save_every=10")
    trained, asked = run_driver(cfg, monkeypatch)
    assert asked == [1, 2, 3]
    assert [{v for r in responses for v, _ in r.completion.versions} for *_, responses, _ in trained] == [{0}, {1}, {2}]


@pytest.mark.parametrize("partial", [False, True], ids=["whole", "partial"])
def test_a_killed_driver_resumes_to_train_what_an_unkilled_one_trains(tmp_path, monkeypatch, partial):
    """Checkpoints every 2 of 6 steps with batches buffered at each (k = 1). Killed generating batch 4 (batch
    3 buffered in step 2's checkpoint), in step 5's update and in step 6's save, each run resumes; the
    prompts trained at each step, and the metrics rows, equal an unkilled run's."""
    settings = ["trainer.max_steps=6", "trainer.save_every=2", "algo.max_staleness=1"]
    if partial:
        settings += ["rollout.partial=true", "rollout.partial_extra=0.5"]
    unkilled = config(tmp_path / "unkilled", *settings)
    _, asked_once = run_driver(unkilled, monkeypatch)
    killed = config(tmp_path / "killed", *settings)
    asked = []
    for kill in (("generate", 4), ("update", 5), ("save", 6), None):
        _, batches = run_driver(killed, monkeypatch, kill)
        asked += batches
    expected_rolled, expected_rows = trained_course(tmp_path / "unkilled" / "run")
    assert trained_course(tmp_path / "killed" / "run") == (expected_rolled, expected_rows)
    assert [row["step"] for row in expected_rows] == [1, 2, 3, 4, 5, 6]
    assert len(expected_rolled) == 6 * 4 and len(set(expected_rolled)) == 24
    # batch 3 (buffered in step 2's checkpoint) and batch 5 (in step 4's) are not made again after the kills
    assert asked.count(3) == asked_once.count(3) and asked.count(5) == asked_once.count(5)
    if partial:  # responses continued across a sync: some tokens were one version old, none older is trained
        assert any(row.get("staleness/age_1", 0) > 0 for row in expected_rows)
        assert max(row["staleness/max"] for row in expected_rows) >= 2
        assert any(row["staleness/left_out"] > 0 for row in expected_rows)


def test_tokens_older_than_k_versions_stay_out_of_the_losses_and_older_ones_are_marked():
    def response(versions):
        tokens = sum(count for _, count in versions)
        completion = Completion([1] * tokens, [0.0] * tokens, "stop", versions)
        return SimpleNamespace(completion=completion, valid=True, behind=0, stale=0)

    responses = [response([(3, 2), (4, 3), (5, 1)]), response([(5, 4)])]
    mark_ages(responses, version=5, max_staleness=1)
    assert [r.behind for r in responses] == [5, 0]  # versions 3 and 4 sampled the first five
    assert [r.stale for r in responses] == [2, 0]  # version 3's two tokens are 2 old
    figures = staleness_metrics(responses, version=5)
    assert figures["staleness/max"] == 2 and figures["staleness/mean"] == pytest.approx((2 * 2 + 3) / 10)
    assert (figures["staleness/age_0"], figures["staleness/age_1"], figures["staleness/age_2"]) == (0.5, 0.3, 0.2)
    assert figures["staleness/left_out"] == pytest.approx(0.2)


def test_a_checkpoint_keeps_buffered_image_prompts_and_makes_their_pixels_again(tmp_path, tiny_processor):
    """`rollouts.pkl` holds what the producer buffered without the prompts' pixels (megabytes a prompt at
    728 px); loading makes them again from the encoded images, equal, and keeps shared prompts shared."""
    cfg = config(tmp_path, "algo.max_staleness=1", "rollout.partial=true")
    producer = RolloutProducer(cfg, tiny_processor, None, prompt_loader(cfg, tiny_processor), [])
    prompt = image_prompt(tiny_processor, (600, 300))
    producer.drawn = [prompt]
    producer.carry = [[Response(0, prompt, Completion([5, 6], [-0.1, -0.2], "paused", [(3, 2)]))]]
    producer.save(tmp_path / "rollouts.pkl")
    assert (tmp_path / "rollouts.pkl").stat().st_size < prompt.sample.pixels.data.numel() / 10
    restored = RolloutProducer(cfg, tiny_processor, None, prompt_loader(cfg, tiny_processor), [])
    restored.load(tmp_path / "rollouts.pkl", producer.loader.state_dict(), step=4)
    response = restored.carry[0][0]
    assert response.prompt is restored.drawn[0] and response.completion.versions == [(3, 2)]
    assert torch.equal(response.prompt.sample.pixels.data, prompt.sample.pixels.data)
    assert response.prompt.sample.pixels.windows == prompt.sample.pixels.windows


def test_whole_groups_too_old_to_train_anything_have_their_prompts_answered_again(tmp_path, tiny_processor):
    """k = 1, building batch 5 (trained by version 4): a whole group made by version 2 would have every token
    left out; its prompt goes back to be answered first in the next round, counted. One with a token of
    version 3 stays."""
    cfg = config(tmp_path, "algo.max_staleness=1", "rollout.partial=true")
    producer = RolloutProducer(cfg, tiny_processor, None, prompt_loader(cfg, tiny_processor), [])
    producer.next_step = 5
    prompts = [image_prompt(tiny_processor), image_prompt(tiny_processor, (90, 120))]
    old, kept = ([Response(0, p, Completion([1, 2], [0.0, 0.0], "stop", versions))] for p, versions in
                 zip(prompts, ([(2, 2)], [(2, 1), (3, 1)]), strict=True))  # fmt: skip
    producer.unscored = [old, kept]
    producer.scorer = SimpleNamespace(score=lambda requests: [SimpleNamespace(score=0.0, status="ok", valid=True,
                                      components={}) for _ in requests], service_stats=dict)  # fmt: skip
    producer._score()
    assert producer.whole == [kept] and producer.reissued == [prompts[0]] and producer.building.reissued == 1
