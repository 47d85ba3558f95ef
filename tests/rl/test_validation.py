"""RL validation (rl/validation.py): its figures, its fixed prompt set, its schedule, and the driver's loop with
fake actors (no Ray), which shows that validation responses never reach the update and that a killed and
re-run driver neither repeats nor skips an evaluation."""

from types import SimpleNamespace

import pytest
import torch

import rl.driver
import rl.producer
from rl.driver import Driver
from rl.experience import Completion, Prompt, Response
from rl.prompts import prompt_loader
from rl.validation import Validation, validation_metrics
from step3vl_train.data.shards import ShardSetWriter
from step3vl_train.train.metrics import read_jsonl
from tests.rl.compose import compose_rl
from tests.rl.format_task import write_prompts

# Held-out prompts of two sources, each asking for one digit; the fake engine's j-th sample answers j.
HELD_OUT = {"digits": ["1", "1", "5"], "pairs": ["0", "2"]}


def write_held_out(root):
    """The shards of HELD_OUT, and the override that makes them `prompts.eval`."""
    for source, answers in HELD_OUT.items():
        writer = ShardSetWriter(str(root / source), max_samples=2)
        for index, answer in enumerate(answers):
            record = {"messages": [{"role": "user", "content": f"Say {answer}."}], "answer": answer, "reward": "math"}
            writer.write(f"held-{source}-{index}", record, [], [])
        writer.close()
    sources = [f"{{name: {source}, paths: ['{root / source}/*.tar']}}" for source in HELD_OUT]
    return f"prompts.eval=[{', '.join(sources)}]"


def config(tmp_path, *overrides):
    prompts = write_prompts(tmp_path / "train", 32)
    return compose_rl(
        "stage=rlvr", "model=tiny", "processor=tiny", "logging.mode=disabled", f"prompts.train={prompts}/*.tar",
        write_held_out(tmp_path / "held_out"),
        "prompts.prompts_per_step=4", "rollout.n=2", "algo.minibatches=2", "algo.estimator=grpo",
        "critic.enabled=false", "rollout.max_new_tokens=16", "reward.num_workers=1", "rollout.eval.n=4",
        "rollout.eval.temperature=0.7", "rollout.eval.max_new_tokens=12", f"trainer.output_dir={tmp_path / 'run'}",
        *overrides,
    )  # fmt: skip


def response(group, reward, valid=True, task="a"):
    prompt = Prompt(key=f"k{group}", task=task, sample=None, messages=[], images=[], reward="math")
    return Response(group, prompt, Completion([1, 2], [0.0, 0.0], "stop"), reward=reward, valid=valid)


def test_pass_at_1_is_the_mean_over_prompts_of_each_ones_share_solved():
    """Prompt 0: 1 of its 2 valid responses solves it (the other two failed to score); prompt 1: 3 of 4; a
    reward of 0.9 is not a solve. Pooled, 4 of 6 valid responses solve: the mean over prompts is not that."""
    responses = [response(0, 1.0), response(0, 0.0, valid=False), response(0, 0.0, valid=False), response(0, 0.0)]
    responses += [response(1, 1.0, task="b"), response(1, 1.0, task="b"), response(1, 1.0, task="b")]
    responses += [response(1, 0.9, task="b")]
    row = validation_metrics(responses)
    assert row["eval/pass@1"] == pytest.approx((1 / 2 + 3 / 4) / 2)
    assert row["eval/reward"] == pytest.approx(4.9 / 6)
    assert (row["eval/pass@1/a"], row["eval/reward/a"]) == (0.5, 0.5)
    assert row["eval/pass@1/b"] == 0.75 and row["eval/reward/b"] == pytest.approx(3.9 / 4)
    assert (row["eval/prompts"], row["eval/responses"]) == (2, 8)
    nothing_valid = validation_metrics([response(0, 0.0, valid=False)])
    assert nothing_valid["eval/reward"] is None and nothing_valid["eval/pass@1"] is None


def test_the_eval_set_is_the_same_prompts_every_time_capped_per_source(tmp_path, tiny_processor):
    validation = Validation(config(tmp_path, "prompts.eval_max_prompts=2"), tiny_processor)
    first = [(p.task, p.key) for p in validation.prompts()]
    assert [task for task, _ in first] == ["digits", "digits", "pairs", "pairs"]
    assert [(p.task, p.key) for p in validation.prompts()] == first
    assert (validation.sampling.n, validation.sampling.temperature, validation.sampling.max_new_tokens) == (4, 0.7, 12)
    uncapped = Validation(config(tmp_path / "all"), tiny_processor)
    assert len(uncapped.prompts()) == 5


def test_schedule_every_n_at_the_last_step_and_before_training(tmp_path, tiny_processor):
    cfg = config(tmp_path, "trainer.eval_every=4", "trainer.max_steps=10", "trainer.eval_before_train=true")
    validation = Validation(cfg, tiny_processor)
    assert [step for step in range(11) if validation.due(step)] == [0, 4, 8, 10]
    cfg.trainer.eval_before_train, cfg.trainer.eval_every = False, 0
    assert not any(validation.due(step) for step in range(11))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["prompts.eval=[]", "trainer.eval_every=2"], "prompts.eval is empty"),
        (["prompts.eval=[]", "trainer.eval_before_train=true"], "prompts.eval is empty"),
        (["trainer.eval_every=-1"], "trainer.eval_every must be 0"),
        (["prompts.eval_max_prompts=0"], "prompts.eval_max_prompts must be positive"),
        (["rollout.eval.n=0"], "rollout.eval.n must be at least 1"),
    ],
)
def test_bad_validation_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(Exception, match=message):
        config(tmp_path, *overrides)


class Killed(Exception):
    """The driver's death, as a SIGKILL would end it, in the middle of an update."""


class Actor:
    """`actor.method.remote(...)` runs the method now; the fake `ray.get` hands its value back."""

    def __init__(self, target):
        self.target = target

    def __getattr__(self, name):
        return SimpleNamespace(remote=getattr(self.target, name))


class FakeEngine:
    """The j-th sample of every prompt answers `\\boxed{j}`."""

    def __init__(self, driver, events, tokenizer):
        self.driver, self.events, self.tokenizer = driver, events, tokenizer

    def generate(self, prompts, sampling, seed):
        kind = "eval" if seed < 0 else "train"
        self.events.append((kind, self.driver.step, [p.key for p in prompts], sampling))
        stop = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        ids = [self.tokenizer.encode(f"I pick one.</think>\\boxed{{{j}}}") + [stop] for j in range(sampling.n)]
        return [[Completion(t, [0.0] * len(t), "stop") for t in ids] for _ in prompts], 0.0

    def pid(self):
        return 0

    def sleep(self):
        self.events.append(("sleep", self.driver.step, [], None))

    def wake_up(self, tags):
        self.events.append(("wake_up", self.driver.step, tags, None))


class FakeWorker:
    def __init__(self, driver, events, kill_at):
        self.driver, self.events, self.kill_at = driver, events, kill_at

    def score(self, responses, temperature):
        return SimpleNamespace(
            old_logprobs=[torch.zeros(r.length) for r in responses], values=None, entropy_sum=0.0, image_cache={}
        )

    def update(self, responses, counts):
        if self.driver.step == self.kill_at:
            raise Killed
        self.events.append(("update", self.driver.step, [r.prompt.key for r in responses], counts))
        return {"policy_loss": 0.0, "value_loss": 0.0, "clip_tokens": 0.0, "approx_kl": 0.0, "policy_grad_norm": 0.0}

    def save(self, path):
        if self is self.driver.workers[0].target:  # the step's checkpoint, once
            self.events.append(("save", self.driver.step, [], None))

    def sync_weights(self, engines, everything):
        if self is self.driver.workers[0].target:
            self.events.append(("sync", self.driver.step, [], everything))
        return {}

    def load(self, path):
        pass

    def pid(self):
        return 0

    def close(self):
        pass


def run_driver(cfg, monkeypatch, kill_at=None):
    """`Driver.run` with fake actors in place of Ray's; `kill_at`: the step whose update kills the driver.
    Returns what the actors were asked, in order."""
    events = []

    def start_actors(driver):
        driver.workers = [Actor(FakeWorker(driver, events, kill_at)) for _ in range(cfg.trainer.world_size)]
        driver.engines = [Actor(FakeEngine(driver, events, driver.processor.tokenizer))]

    run_with_fake_actors(cfg, monkeypatch, start_actors, killed=kill_at is not None)
    return events


def run_with_fake_actors(cfg, monkeypatch, start_actors, killed: bool) -> None:
    """`Driver.run` with the actors `start_actors(driver)` makes and a Ray that calls them in place;
    `killed`: the run must end in `Killed`."""
    fake_ray = SimpleNamespace(get=lambda refs, timeout=None: refs, wait=lambda refs, timeout=None: (refs, []),
                               kill=lambda actor: None,
                               util=SimpleNamespace(remove_placement_group=lambda group: None))  # fmt: skip
    monkeypatch.setattr(rl.driver, "ray", fake_ray)
    monkeypatch.setattr(rl.producer, "ray", fake_ray)

    def start(driver):
        start_actors(driver)
        driver.group = None

    monkeypatch.setattr(Driver, "start_actors", start)
    driver = Driver(cfg, {})
    if killed:
        with pytest.raises(Killed):
            driver.run()
    else:
        driver.run()


def record_key(key):
    return key.split(":")[-1]


def test_validation_stays_out_of_the_update_and_a_rerun_neither_repeats_nor_skips_one(
    tmp_path, monkeypatch, tiny_processor
):
    """Validation every 2 of 5 iterations and before training; checkpoints every 2. The driver is killed in
    step 1's update (no checkpoint yet: the re-run starts over, its step-0 validation already logged), then
    in step 3's (resumed from step 2), then finishes. Validations ran after steps 0, 2, 4 and 5, once each,
    each before its step's checkpoint, on the same prompts with rollout.eval's sampling; every update took
    exactly its step's training responses, none of validation's."""
    cfg = config(tmp_path, "trainer.max_steps=5", "trainer.save_every=2", "trainer.eval_every=2",
                 "trainer.eval_before_train=true")  # fmt: skip
    runs = [run_driver(cfg, monkeypatch, kill_at) for kill_at in (1, 3, None)]
    events = [event for run in runs for event in run]
    # the training prompts are the loader's sequence, as without validation (each step's last rollout)
    loader = prompt_loader(cfg, tiny_processor)
    assert {step: keys for kind, step, keys, _ in events if kind == "train"} == {
        step: [prompt.key for prompt in loader.next_batch(4)] for step in range(1, 6)
    }

    order = [(kind, step) for kind, step, *_ in events if kind in ("eval", "save")]
    assert order == [("eval", 0), ("eval", 2), ("save", 2), ("eval", 4), ("save", 4), ("eval", 5), ("save", 5)]
    held_out = sorted(f"held-{source}-{i}" for source, answers in HELD_OUT.items() for i in range(len(answers)))
    for kind, _, keys, sampling in events:
        if kind == "eval":
            assert sorted(map(record_key, keys)) == held_out
            assert (sampling.n, sampling.temperature, sampling.max_new_tokens) == (4, 0.7, 12)

    for run in runs:
        rolled_out = {step: keys for kind, step, keys, _ in run if kind == "train"}
        updated = {}
        for kind, step, keys, counts in run:
            if kind == "update":  # a rank's share of the step's 2 minibatches
                assert sum(c.sequences for c in counts) == 4 * 2  # the training batch: 4 prompts x 2 responses
                updated[step] = updated.get(step, []) + keys
        assert all(not record_key(key).startswith("held-") for keys in updated.values() for key in keys)
        assert {step: sorted(keys) for step, keys in updated.items()} == {
            step: sorted(keys * 2) for step, keys in rolled_out.items() if step in updated
        }
    assert [sorted(updated) for updated in ([e[1] for e in run if e[0] == "update"] for run in runs)] == [
        [],
        [1, 1, 2, 2],
        [3, 3, 4, 4, 5, 5],
    ]

    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [row["step"] for row in metrics] == [0, 1, 2, 3, 4, 5]
    evaluated = [row for row in metrics if "eval/pass@1" in row]
    assert [row["step"] for row in evaluated] == [0, 2, 4, 5]
    assert set(metrics[0]) == {"step", "time/eval"} | {key for key in metrics[2] if key.startswith("eval/")}
    # the 4 samples of "Say 1." hold one 1, of "Say 5." none; "Say 0." and "Say 2." one each
    expected = {"eval/pass@1": 0.2, "eval/pass@1/digits": 1 / 6, "eval/pass@1/pairs": 0.25, "eval/prompts": 5,
                "eval/responses": 20, "eval/reward": 0.2}  # fmt: skip
    assert all(row[key] == pytest.approx(value) for row in evaluated for key, value in expected.items())
