"""The RL loop (one process, the Ray driver): prompts -> rollouts -> rewards -> the trainer's log-probs
and values -> advantages -> policy and critic updates -> weight sync, then validation on held-out prompts
every `trainer.eval_every` iterations (rl/validation.py) and a checkpoint every `trainer.save_every`. A run
re-started with the same command resumes from its latest checkpoint; a training or rollout actor that dies
mid-run, or a weight sync that fails or outlasts `rollout.sync_timeout_s`, is replaced, and the run goes on
from that checkpoint (at most `trainer.max_restarts` times). On SIGTERM the run stops after the iteration
in flight and saves it (train/preemption.py; docs/rl.md, "Stopping a run")."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import ray
import torch
from omegaconf import OmegaConf
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from tqdm import tqdm

from rl.config import RLConfig
from rl.engines import engine_environment, engine_options
from rl.experience import Response
from rl.iteration import (
    LOGPROB_SUMS,
    advantages,
    group_responses,
    log_rollouts,
    logprob_metrics,
    minibatches,
    rank_shares,
    score_rewards,
)
from rl.producer import RolloutProducer
from rl.prompts import prompt_loader
from rl.rewards import RewardScorer
from rl.staleness import mark_ages, staleness_metrics
from rl.validation import EVAL_SEED, Validation, evaluated_before_training, validation_metrics
from rl.workers.group import start_rollout_engines, start_train_group
from step3vl_train.cli import resume_hint
from step3vl_train.processing.processor import load_processor
from step3vl_train.train.checkpoint import Checkpointer, rng_state, set_rng_state
from step3vl_train.train.metrics import MetricsLog, truncate_jsonl
from step3vl_train.train.preemption import Preempted, StopRequest

logger = logging.getLogger("rl")
ROLLOUTS = "rollouts.pkl"  # in a checkpoint: the producer's buffered rollouts (algo.max_staleness >= 1)


class SyncFailed(RuntimeError):
    """A weight sync that failed, or did not end within `rollout.sync_timeout_s`; the message names the
    engines that failed or do not answer."""


def save_config(run_dir: Path, raw_config: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(raw_config), run_dir / "config.yaml")


def finished_step(config: RLConfig) -> int | None:
    """The step of the run's latest checkpoint when it is at `trainer.max_steps` or beyond (the run has
    nothing left to do), else None. Read before Ray, the actors and a reward service start."""
    latest = Checkpointer(Path(config.trainer.output_dir), keep_last=0).latest()
    if latest is None or not (latest / "driver.pt").is_file():  # the latter: resume() will say what is wrong
        return None
    step = torch.load(latest / "driver.pt", weights_only=True)["step"]
    return step if step >= config.trainer.max_steps else None


class Driver:
    def __init__(
        self, config: RLConfig, raw_config: dict, service_url: str | None = None, service_token: str | None = None
    ):
        """`service_url`, `service_token`: the reward-model service this run started, if it did."""
        self.cfg = config
        self.raw_config = raw_config
        self.run_dir = Path(config.trainer.output_dir).resolve()
        self.processor = load_processor(config.tokenizer, config.processor or None)
        tokenizer = self.processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.scorer = RewardScorer(config.reward, service_url, service_token)
        self.engines: list = []
        self.producer = self.new_producer()  # checks the prompt sources now
        self.checkpointer = Checkpointer(self.run_dir, config.trainer.keep_last)
        self.validation = Validation(config, self.processor)  # checks the eval sources now
        self.step = 0
        self.workers: list = []
        self.engine_pids: list[int] = []
        self.restarts = 0  # times the actors were replaced in this process
        self.start_sync: dict[str, float] = {}  # logged with the first iteration after the engines start
        # SIGTERM: stop after the iteration in flight, or abandon it when trainer.preempt_grace_s runs out.
        self.stop = StopRequest(config.trainer.preempt_grace_s, abandon_at_deadline=True)
        self.stopped: str | None = None  # where the run stopped on SIGTERM, once it has
        self.save_s: float | None = None  # how long the last save took

    # ---- actors ---------------------------------------------------------------------------------------

    def start_actors(self) -> None:
        cfg, rollout = self.cfg, self.cfg.rollout
        self.workers, self.group = start_train_group(
            cfg.trainer.world_size,
            cfg.trainer.num_gpus_per_rank,
            self.raw_config,
            self.pad_token_id,
            cfg.trainer_gpu_share,
        )
        if rollout.colocate:  # vLLM profiles its GPU's memory as it starts: the training ranks there are up first
            ray.get([w.pid.remote() for w in self.workers])
        options = [
            engine_options(cfg, self.pad_token_id, load_weights=False, index=index, restarts=self.restarts)
            for index in range(rollout.num_engines)
        ]
        self.engines = start_rollout_engines(
            rollout.engine,
            options,
            cfg.engine_gpus,
            engine_environment(rollout),
            self.group if rollout.colocate else None,
            concurrency=2 if rollout.partial else 1,
        )
        self.engine_pids = ray.get([e.pid.remote() for e in self.engines])
        pids = {"train": ray.get([w.pid.remote() for w in self.workers]), "rollout": self.engine_pids}
        (self.run_dir / "actors.json").write_text(json.dumps(pids))

    def an_actor_died(self) -> bool:
        """Whether a training or rollout actor is gone. A rank's death can reach the driver first as the
        failed collective of a surviving rank (a RayTaskError: "connection reset by peer"); the dead actor
        tells which it is. One that does not answer within a minute counts as dead."""
        for actor in self.workers + self.engines:
            try:
                ray.get(actor.pid.remote(), timeout=60)
            except (RayActorError, GetTimeoutError):
                return True
        return False

    def stop_actors(self) -> None:
        for actor in self.workers + self.engines:
            ray.kill(actor)
        if self.workers:
            ray.util.remove_placement_group(self.group)
        self.workers, self.engines = [], []
        self.producer.stop()  # after the engines: a generation it waits on ends with them

    # ---- the run --------------------------------------------------------------------------------------

    def run(self) -> None:
        """The run to its end, or to a stop on SIGTERM, which raises `Preempted` once the actors are gone."""
        save_config(self.run_dir, self.raw_config)
        self.restarts = 0
        try:
            with self.stop.installed():  # in place of Ray's own handler (ray.init's), until the actors are gone
                while True:
                    try:
                        self.start_actors()
                        self.resume()
                        metrics = MetricsLog(self.run_dir, self.step, self.cfg.logging, self.raw_config)
                        truncate_jsonl(self.run_dir / "rollouts.jsonl", self.step)
                        try:
                            self.loop(metrics)
                        finally:
                            metrics.close()
                        ray.get([worker.close.remote() for worker in self.workers])
                        break
                    except (RayActorError, RayTaskError, SyncFailed) as error:
                        if self.stop.requested:  # the signal reached the actors too (sent to the process group)
                            raise Preempted(f"stopped by SIGTERM in step {self.step}, as were the actors") from error
                        if isinstance(error, RayTaskError) and not self.an_actor_died():
                            raise
                        self.restarts += 1
                        if self.restarts > self.cfg.trainer.max_restarts:
                            if isinstance(error, SyncFailed):
                                limit = f"Stopping after trainer.max_restarts={self.cfg.trainer.max_restarts}."
                                raise SyncFailed(f"{error}. {limit} {resume_hint(self.run_dir)}") from None
                            raise
                        what = error if isinstance(error, SyncFailed) else f"an actor died ({error})"
                        logger.error("%s; restarting from the latest checkpoint (%d/%d)",
                                     what, self.restarts, self.cfg.trainer.max_restarts)  # fmt: skip
                    finally:
                        self.stop_actors()
        finally:
            self.scorer.close()
        if self.stopped is not None:
            raise Preempted(self.stopped)

    def new_producer(self) -> RolloutProducer:
        loader = prompt_loader(self.cfg, self.processor)
        return RolloutProducer(self.cfg, self.processor, self.scorer, loader, self.engines)

    def resume(self) -> None:
        latest = self.checkpointer.latest()
        self.step = 0
        # A fresh loader even after a restart with no checkpoint yet: the run starts over from its first prompt.
        self.producer = self.new_producer()
        if latest is not None:
            ray.get([worker.load.remote(str(latest)) for worker in self.workers])
            state = torch.load(latest / "driver.pt", weights_only=True)
            self.step = state["step"]
            self.producer.load(latest / ROLLOUTS, state["prompts"], self.step)
            set_rng_state(state["rng"])
            logger.info("resumed from step %d (of %d): %s", self.step, self.cfg.trainer.max_steps, latest)
        # The engines have just started: every tensor, the frozen ones included, this once.
        self.start_sync = {f"sync_start/{k.removeprefix('sync_')}": v for k, v in self.sync_weights(True).items()}

    def loop(self, metrics: MetricsLog) -> None:
        if self.step >= self.cfg.trainer.max_steps:
            logger.info("%s has already finished: step %d (of %d). Raise trainer.max_steps to go on.",
                        self.run_dir, self.step, self.cfg.trainer.max_steps)  # fmt: skip
            return
        if self.step == 0 and self.validation.due(0) and not evaluated_before_training(self.run_dir):
            metrics.write({"step": 0, **self.evaluate()})
        self.producer.start(self.step)
        progress = tqdm(total=self.cfg.trainer.max_steps, initial=self.step, desc=f"{self.cfg.stage}", unit="it")
        try:
            while self.step < self.cfg.trainer.max_steps:
                if self.stop.requested:
                    self.stop_here()
                    return
                self.step += 1
                row = self.iteration()
                if self.validation.due(self.step):  # before the step's checkpoint: a resume does not redo it
                    row |= self.evaluate()
                metrics.write(row | self.start_sync)
                self.start_sync = {}
                reward, length = f"{row['reward_mean']:.3f}", f"{row['response_len_mean']:.0f}"
                progress.set_postfix(reward=reward, length=length, refresh=False)
                progress.update(1)
                if self.step % self.cfg.trainer.save_every == 0 or self.step == self.cfg.trainer.max_steps:
                    self.save()
                self.producer.resume(self.step)
        finally:
            progress.close()
        logger.info("finished: step %d (of %d); the last checkpoint is %s", self.step, self.cfg.trainer.max_steps,
                    self.checkpointer.latest())  # fmt: skip

    def stop_here(self) -> None:
        """After a SIGTERM, between iterations: saves the last one where it has not been saved and the save
        fits in what is left of trainer.preempt_grace_s (the run's first save is always tried)."""
        self.producer.pause()  # what it holds is saved as it stands
        if self.step and not self.checkpointer.published(self.step):
            if self.stop.save_fits(self.save_s):
                self.save()
            else:
                logger.info("not saving step %d: the last save took %.0f s, and %.0f s of trainer.preempt_grace_s "
                            "are left", self.step, self.save_s, self.stop.grace_s - self.stop.elapsed())  # fmt: skip
        self.stopped = f"stopped by SIGTERM at step {self.step} (of {self.cfg.trainer.max_steps})"

    def iteration(self) -> dict:
        """One update on the producer's next batch, then the weight sync, with the producer paused (the
        loop resumes it once validation and the checkpoint are done)."""
        cfg, started = self.cfg, time.perf_counter()
        batch, waited = self.producer.take(self.step)
        responses, timings = batch.responses, {**batch.timings, "time/wait_rollouts": waited}
        log_rollouts(self.run_dir / "rollouts.jsonl", self.step, responses, cfg.rollout.n,
                     cfg.trainer.log_responses, self.processor.tokenizer.decode)  # fmt: skip
        self.sleep_engines()
        self.score_with_models(responses, timings)
        mark_ages(responses, self.step - 1, cfg.algo.max_staleness)
        row = advantages(cfg, responses, self.entropy_sum) | staleness_metrics(responses, self.step - 1)
        shards, counts = minibatches(cfg, responses, self.step, len(self.workers))
        tick = time.perf_counter()
        sums = ray.get([w.update.remote(s, counts) for w, s in zip(self.workers, shards, strict=True)])
        sums = sums[:: cfg.sequence_parallel]  # a sequence-parallel group's ranks return the same sums
        timings["time/update"] = time.perf_counter() - tick
        tick = time.perf_counter()
        self.producer.pause()
        timings["time/pause"] = time.perf_counter() - tick
        tick = time.perf_counter()
        self.wake_engines(["weights"])
        sync = self.sync_weights(False)
        self.wake_engines(["kv_cache"])
        timings["time/sync"] = time.perf_counter() - tick
        valid_tokens = sum(c.tokens for c in counts)
        if cfg.on_policy_update:  # no scoring pass gave the old log-probs: the update's forward did
            totals = {key: sum(s[key] for s in sums) for key in LOGPROB_SUMS} | {
                "mismatch_max": max(s["mismatch_max"] for s in sums)
            }
            row |= logprob_metrics(totals["entropy_sum"], row["tokens"], totals)
        row |= {
            "step": self.step,
            "policy_loss": sum(s["policy_loss"] for s in sums) / len(counts),  # mean over minibatches
            "value_loss": sum(s["value_loss"] for s in sums) / len(counts) if cfg.uses_critic else None,
            "clip_fraction": sum(s["clip_tokens"] for s in sums) / max(valid_tokens, 1),
            "approx_kl": sum(s["approx_kl"] for s in sums) / max(valid_tokens, 1),
            "grad_norm": sums[0]["policy_grad_norm"],
            **batch.stats,
            **self.image_cache,
            **{f"sync/{k.removeprefix('sync_')}": v for k, v in sync.items()},
            **timings,
            "time/step": time.perf_counter() - started,
        }
        return row

    # ---- phases ---------------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Validation's figures for the step's row; its responses end here, outside the update. The engines
        are free: before the producer starts, or while it is paused."""
        tick = time.perf_counter()
        prompts = self.validation.prompts()
        completions = self.producer.answer(prompts, self.validation.sampling, EVAL_SEED)
        responses = group_responses(prompts, completions)
        score_rewards(self.scorer, responses, self.processor.tokenizer.decode, self.producer.sampling.stop_token_ids)
        return validation_metrics(responses) | {"time/eval": time.perf_counter() - tick}

    def score_with_models(self, responses: list[Response], timings: dict) -> None:
        tick = time.perf_counter()
        parts = rank_shares(responses, len(self.workers), self.cfg.sequence_parallel)
        stats = ray.get(
            [w.score.remote(p, self.cfg.rollout.temperature) for w, p in zip(self.workers, parts, strict=True)]
        )
        parts, stats = parts[:: self.cfg.sequence_parallel], stats[:: self.cfg.sequence_parallel]  # a group's once
        for part, stat in zip(parts, stats, strict=True):
            for index, response in enumerate(part):
                response.old_logprobs = stat.old_logprobs[index] if stat.old_logprobs is not None else None
                response.values = stat.values[index] if stat.values is not None else None
        self.entropy_sum = sum(s.entropy_sum for s in stats)
        self.image_cache = {key: sum(s.image_cache[key] for s in stats) for key in stats[0].image_cache}
        timings["time/score"] = time.perf_counter() - tick

    def sync_weights(self, everything: bool) -> dict:
        """The weight sync (a collective of every training rank) within `rollout.sync_timeout_s`. A rank that
        fails ends the wait at once; a sender waiting in a broadcast that a failed engine never joined ends
        it at the deadline. Either raises `SyncFailed`, naming the engines."""
        calls = [w.sync_weights.remote(self.engines, everything) for w in self.workers]
        timeout = self.cfg.rollout.sync_timeout_s
        deadline, pending = time.monotonic() + timeout, list(calls)
        while pending:
            done, pending = ray.wait(pending, timeout=max(deadline - time.monotonic(), 0))
            if not done:
                raise SyncFailed(self.sync_failure(f"did not end within rollout.sync_timeout_s={timeout:g} s"))
            try:
                ray.get(done)
            except RayTaskError as error:
                first_line = str(error.cause if error.cause is not None else error).strip().splitlines()[-1]
                raise SyncFailed(self.sync_failure(f"failed on a training rank ({first_line})")) from error
        return ray.get(calls[0])

    def sync_failure(self, what: str) -> str:
        """`what` happened to the weight sync after step N, and what each engine says of it."""
        engines, probes = [], [engine.sync_failure.remote() for engine in self.engines]
        deadline = time.monotonic() + 10  # for all of them: eight hung engines are not eight waits
        for index, (probe, pid) in enumerate(zip(probes, self.engine_pids, strict=True)):
            try:
                failure = ray.get(probe, timeout=max(deadline - time.monotonic(), 0))
            except GetTimeoutError:
                failure = "does not answer (still in the update, or hung)"
            except RayActorError:
                failure = "has died"
            if failure:
                engines.append(f"rollout engine {index} (pid {pid}): {failure}")
        named = "; ".join(engines) if engines else "no rollout engine reported a failure"
        return f"the weight sync after step {self.step} {what}: {named}"

    def wake_engines(self, tags: list[str]) -> None:
        """Colocated engines take back their GPU memory: the weights before the sync, the KV cache after it."""
        if self.cfg.rollout.colocate:
            ray.get([e.wake_up.remote(tags) for e in self.engines])

    def sleep_engines(self) -> None:
        """Colocated engines give their GPU memory to the trainer between rollouts."""
        if self.cfg.rollout.colocate:
            ray.get([e.sleep.remote() for e in self.engines])

    def save(self) -> None:
        """The workers' shards and `driver.pt` into a partial directory, published once all is on disk."""
        started = time.perf_counter()
        partial = self.checkpointer.begin(self.step)
        ray.get([worker.save.remote(str(partial)) for worker in self.workers])
        state = {"step": self.step, "prompts": self.producer.loader.state_dict(), "rng": rng_state()}
        torch.save(state, partial / "driver.pt")
        if self.producer.holds_rollouts:
            self.producer.save(partial / ROLLOUTS)
        self.checkpointer.commit(self.step)
        self.save_s = time.perf_counter() - started
