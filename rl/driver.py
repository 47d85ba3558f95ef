"""The RL loop (one process, the Ray driver): prompts -> rollouts -> rewards -> the trainer's log-probs
and values -> advantages -> policy and critic updates -> weight sync, then a checkpoint every
`run.save_every` iterations. A run re-started with the same command resumes from its latest checkpoint;
a training or rollout actor that dies mid-run is replaced, and the run goes on from that checkpoint."""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import ray
import torch
from omegaconf import OmegaConf
from ray.exceptions import RayActorError
from tqdm import tqdm

from rl.algos.advantages import compute_advantages, uniform_groups
from rl.algos.losses import GlobalCounts, explained_variance
from rl.config import RLConfig
from rl.engines import SamplingParams
from rl.experience import Prompt, Response
from rl.prompts import PromptLoader
from rl.rewards import RewardRequest, RewardScorer
from rl.workers.group import start_rollout_engines, start_train_group
from step3vl_train.processing.processor import load_processor
from step3vl_train.train.checkpoint import Checkpointer, rng_state, set_rng_state
from step3vl_train.train.metrics import MetricsLog, truncate_jsonl

logger = logging.getLogger("rl")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


class Driver:
    def __init__(self, config: RLConfig, raw_config: dict):
        self.cfg = config
        self.raw_config = raw_config
        self.run_dir = Path(config.run.output_dir).resolve()
        self.processor = load_processor(config.tokenizer, config.processor or None)
        tokenizer = self.processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.stop_token_ids = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS if t in tokenizer.get_vocab()]
        self.loader = PromptLoader(config.prompts, self.processor, config.reward.fn)  # checks the sources now
        self.scorer = RewardScorer(config.reward)
        self.checkpointer = Checkpointer(self.run_dir, config.run.keep_last)
        self.sampling = SamplingParams(
            n=config.rollout.n,
            temperature=config.rollout.temperature,
            top_p=config.rollout.top_p,
            top_k=config.rollout.top_k,
            max_new_tokens=config.rollout.max_new_tokens,
            stop_token_ids=self.stop_token_ids,
            suppressed_token_ids=sorted(set(vars(self.processor.image_token_ids).values())),
        )
        self.step = 0
        self.workers: list = []
        self.engines: list = []

    # ---- actors ---------------------------------------------------------------------------------------

    def start_actors(self) -> None:
        cfg, rollout = self.cfg, self.cfg.rollout
        share = 0.5 if rollout.colocate else 1.0  # colocated: trainer and engine split each GPU
        self.workers, self.group = start_train_group(
            cfg.run.world_size, cfg.run.num_gpus_per_rank, self.raw_config, self.pad_token_id, share
        )
        if rollout.engine == "hf":  # built from the config; its weights come with the first sync
            options = {
                "model_config": cfg.model,
                "init_from": None,
                "pad_token_id": self.pad_token_id,
                "batch_size": rollout.batch_size,
                "dtype": torch.bfloat16 if cfg.run.use_bf16 else torch.float32,
            }
            num_gpus = cfg.run.num_gpus_per_rank
        else:
            options = {
                "init_from": cfg.policy.init_from,
                "tokenizer": cfg.tokenizer,
                "pad_token_id": self.pad_token_id,
                "processor_config": cfg.processor or None,
                "tensor_parallel_size": rollout.tensor_parallel_size,
                "gpu_memory_utilization": rollout.gpu_memory_utilization,
                "enforce_eager": rollout.enforce_eager,
                "weight_transfer": rollout.weight_transfer,
            }
            num_gpus = cfg.run.num_gpus_per_rank * (1 - share) if rollout.colocate else rollout.tensor_parallel_size
        colocate_with = self.group if rollout.colocate else None
        self.engines = start_rollout_engines(rollout.num_engines, num_gpus, rollout.engine, colocate_with, **options)
        pids = {
            "train": ray.get([w.pid.remote() for w in self.workers]),
            "rollout": ray.get([e.pid.remote() for e in self.engines]),
        }
        (self.run_dir / "actors.json").write_text(json.dumps(pids))

    def stop_actors(self) -> None:
        for actor in self.workers + self.engines:
            ray.kill(actor)
        if self.workers:
            ray.util.remove_placement_group(self.group)
        self.workers, self.engines = [], []

    # ---- the run --------------------------------------------------------------------------------------

    def run(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(self.raw_config), self.run_dir / "config.yaml")
        restarts = 0
        try:
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
                    return
                except RayActorError as error:
                    restarts += 1
                    if restarts > self.cfg.run.max_restarts:
                        raise
                    logger.error("an actor died (%s); restarting from the latest checkpoint (%d/%d)",
                                 error, restarts, self.cfg.run.max_restarts)  # fmt: skip
                finally:
                    self.stop_actors()
        finally:
            self.scorer.close()

    def resume(self) -> None:
        latest = self.checkpointer.latest()
        self.step = 0
        # A fresh loader even after a restart with no checkpoint yet: the run starts over from its first prompt.
        self.loader = PromptLoader(self.cfg.prompts, self.processor, self.cfg.reward.fn)
        if latest is not None:
            ray.get([worker.load.remote(str(latest)) for worker in self.workers])
            state = torch.load(latest / "driver.pt", weights_only=True)
            self.step = state["step"]
            self.loader.load_state_dict(state["prompts"])
            set_rng_state(state["rng"])
            logger.info("resumed from %s", latest)
        self.sync_weights()

    def loop(self, metrics: MetricsLog) -> None:
        progress = tqdm(total=self.cfg.run.max_steps, initial=self.step, desc=f"{self.cfg.stage}", unit="it")
        while self.step < self.cfg.run.max_steps:
            self.step += 1
            row = self.iteration()
            metrics.write(row)
            progress.update(1)
            progress.set_postfix(reward=f"{row['reward_mean']:.3f}", length=f"{row['response_len_mean']:.0f}")
            if self.step % self.cfg.run.save_every == 0 or self.step == self.cfg.run.max_steps:
                self.save()
        progress.close()

    def iteration(self) -> dict:
        cfg, timings, started = self.cfg, {}, time.perf_counter()
        responses, sampling_stats = self.collect(timings)
        self.log_rollouts(responses)
        self.engines_sleep(True)
        self.score_with_models(responses, timings)
        row = self.advantages(responses)
        shards, counts = self.shard(responses)
        tick = time.perf_counter()
        sums = ray.get([w.update.remote(s, counts) for w, s in zip(self.workers, shards, strict=True)])
        timings["time/update"] = time.perf_counter() - tick
        tick = time.perf_counter()
        self.engines_sleep(False)
        sync = self.sync_weights()
        timings["time/sync"] = time.perf_counter() - tick
        valid_tokens = sum(c.tokens for c in counts)
        row |= {
            "step": self.step,
            "policy_loss": sum(s["policy_loss"] for s in sums) / len(counts),  # mean over minibatches
            "value_loss": sum(s["value_loss"] for s in sums) / len(counts) if cfg.uses_critic else None,
            "clip_fraction": sum(s["clip_tokens"] for s in sums) / max(valid_tokens, 1),
            "approx_kl": sum(s["approx_kl"] for s in sums) / max(valid_tokens, 1),
            "grad_norm": sums[0]["policy_grad_norm"],
            **sampling_stats,
            **{f"sync/{k.removeprefix('sync_')}": v for k, v in sync.items()},
            **timings,
            "time/step": time.perf_counter() - started,
        }
        return row

    # ---- phases ---------------------------------------------------------------------------------------

    def collect(self, timings: dict) -> tuple[list[Response], dict]:
        """Prompts, rollouts and rewards. With dynamic sampling, prompts whose responses all scored the same
        are set aside and more are drawn, for up to `algo.max_sampling_rounds` rounds; if the batch is still
        short, set-aside prompts fill it."""
        cfg, n = self.cfg, self.cfg.rollout.n
        target = cfg.prompts.prompts_per_step * n
        kept: list[Response] = []
        spare: list[Response] = []
        dropped = 0
        timings["time/rollout"] = timings["time/reward"] = 0.0
        for round_ in range(cfg.algo.max_sampling_rounds if cfg.algo.drop_uniform_groups else 1):
            prompts = self.loader.next_batch((target - len(kept)) // n)
            responses = self.rollout(prompts, seed=self.step * 1000 + round_, timings=timings)
            tick = time.perf_counter()
            self.reward(responses)
            timings["time/reward"] += time.perf_counter() - tick
            if cfg.algo.drop_uniform_groups:
                rewards = torch.tensor([r.reward for r in responses])
                uniform = uniform_groups(rewards, torch.tensor([r.group for r in responses])).tolist()
                spare += [r for r, same in zip(responses, uniform, strict=True) if same]
                responses = [r for r, same in zip(responses, uniform, strict=True) if not same]
                dropped += sum(uniform) // n
            kept += responses
            if len(kept) == target:
                break
        kept += spare[: target - len(kept)]  # whole groups: both lists hold groups of n in order
        for index, response in enumerate(kept):  # groups numbered afresh across rounds
            response.group = index // n
        return kept, {"dropped_groups": dropped, "prompts_skipped": sum(self.loader.skips.values())}

    def rollout(self, prompts: list[Prompt], seed: int, timings: dict) -> list[Response]:
        tick = time.perf_counter()
        share = -(-len(prompts) // len(self.engines))
        parts = [prompts[i : i + share] for i in range(0, len(prompts), share)]
        calls = [
            e.generate.remote(p, self.sampling, seed * 97 + i)
            for i, (e, p) in enumerate(zip(self.engines, parts, strict=False))
        ]
        completions = [c for part, _ in ray.get(calls) for c in part]
        timings["time/rollout"] += time.perf_counter() - tick
        return [
            Response(group=index, prompt=prompt, completion=completion)
            for index, (prompt, group) in enumerate(zip(prompts, completions, strict=True))
            for completion in group
        ]

    def reward(self, responses: list[Response]) -> None:
        decode = self.processor.tokenizer.decode
        requests = [
            RewardRequest(
                response=decode([t for t in r.completion.token_ids if t not in self.stop_token_ids]),
                reward=r.prompt.reward,
                answer=r.prompt.answer,
                boxes=r.prompt.boxes,
                points=r.prompt.points,
                image_size=r.prompt.image_size,
                truncated=r.completion.finish_reason == "length",
                prompt=r.prompt.question,
            )
            for r in responses
        ]
        for response, result in zip(responses, self.scorer.score(requests), strict=True):
            response.reward, response.status, response.valid = result.score, result.status, result.valid

    def log_rollouts(self, responses: list[Response]) -> None:
        """`rollouts.jsonl`: every prompt of the iteration with its rewards, and the text of the first
        `run.log_responses` responses."""
        n, shown = self.cfg.rollout.n, self.cfg.run.log_responses
        decode = self.processor.tokenizer.decode
        with (self.run_dir / "rollouts.jsonl").open("a") as handle:
            for start in range(0, len(responses), n):
                group = responses[start : start + n]
                row = {
                    "step": self.step,
                    "key": group[0].prompt.key,
                    "task": group[0].prompt.task,
                    "answer": group[0].prompt.answer,
                    "rewards": [r.reward for r in group],
                    "statuses": [r.status for r in group],
                }
                if start < shown:
                    row["responses"] = [decode(r.completion.token_ids) for r in group[: shown - start]]
                handle.write(json.dumps(row) + "\n")

    def score_with_models(self, responses: list[Response], timings: dict) -> None:
        tick = time.perf_counter()
        per_rank = len(responses) // len(self.workers)
        parts = [responses[r * per_rank : (r + 1) * per_rank] for r in range(len(self.workers))]
        stats = ray.get(
            [w.score.remote(p, self.cfg.rollout.temperature) for w, p in zip(self.workers, parts, strict=True)]
        )
        for part, stat in zip(parts, stats, strict=True):
            for index, response in enumerate(part):
                response.old_logprobs = stat.old_logprobs[index]
                response.values = stat.values[index] if stat.values is not None else None
        self.entropy_sum = sum(s.entropy_sum for s in stats)
        timings["time/score"] = time.perf_counter() - tick

    def advantages(self, responses: list[Response]) -> dict:
        """Advantages and returns, and the iteration's reward, length and mismatch metrics."""
        cfg = self.cfg
        length = max(r.length for r in responses)
        mask = torch.zeros(len(responses), length)
        for i, r in enumerate(responses):
            mask[i, : r.length] = float(r.valid)
        values = None
        if cfg.uses_critic:
            values = torch.zeros(len(responses), length)
            for i, r in enumerate(responses):
                values[i, : r.length] = r.values
        valid = torch.tensor([r.valid for r in responses])
        rewards = torch.tensor([r.reward for r in responses])
        groups = torch.tensor([r.group if r.valid else -1 - i for i, r in enumerate(responses)])
        advantages, returns = compute_advantages(
            cfg.algo.estimator, rewards, mask, groups, values, cfg.algo.gamma, cfg.algo.lam, cfg.algo.grpo_scale_by_std
        )
        for i, r in enumerate(responses):
            r.advantages = advantages[i, : r.length]
            r.returns = returns[i, : r.length] if returns is not None else torch.zeros(r.length)
        engine = torch.cat([torch.tensor(r.completion.logprobs) for r in responses if r.valid] or [torch.zeros(0)])
        trainer = torch.cat([r.old_logprobs for r in responses if r.valid] or [torch.zeros(0)])
        gap = (engine - trainer).abs()
        tokens = int(mask.sum())
        row = {
            "reward_mean": float(rewards[valid].mean()) if valid.any() else 0.0,
            "pass_rate": float((rewards[valid] >= 1.0).float().mean()) if valid.any() else 0.0,
            "response_len_mean": float(np.mean([r.length for r in responses])),
            "response_len_max": max(r.length for r in responses),
            "truncated_fraction": float(np.mean([r.completion.finish_reason == "length" for r in responses])),
            "entropy": self.entropy_sum / max(tokens, 1),
            "logprob_mismatch/mean_abs": float(gap.mean()) if len(gap) else 0.0,
            "logprob_mismatch/max_abs": float(gap.max()) if len(gap) else 0.0,
            "explained_variance": explained_variance(values, returns, mask) if values is not None else None,
            "tokens": tokens,
            "samples": len(responses) // cfg.rollout.n,
        }
        by_task = defaultdict(list)
        for r in responses:
            if r.valid:
                by_task[r.prompt.task].append(r.reward)
        row |= {f"reward/{task}": float(np.mean(scores)) for task, scores in sorted(by_task.items())}
        row |= {f"reward_status/{k}": v for k, v in sorted(Counter(r.status for r in responses).items())}
        return row

    def shard(self, responses: list[Response]) -> tuple[list[list[Response]], list[GlobalCounts]]:
        """Responses shuffled, cut into minibatches, each minibatch split evenly over the ranks; with the
        global counts of valid tokens and responses of each minibatch."""
        order = list(responses)
        random.Random(self.cfg.run.seed * 1_000_003 + self.step).shuffle(order)
        minibatches, world = self.cfg.algo.minibatches, len(self.workers)
        size = len(order) // minibatches
        shards: list[list[Response]] = [[] for _ in range(world)]
        counts = []
        for _ in range(self.cfg.algo.epochs):
            for m in range(minibatches):
                minibatch = order[m * size : (m + 1) * size]
                valid = [r for r in minibatch if r.valid]
                counts.append(GlobalCounts(tokens=sum(r.length for r in valid), sequences=len(valid)))
                per_rank = size // world
                for rank in range(world):
                    shards[rank] += minibatch[rank * per_rank : (rank + 1) * per_rank]
        return shards, counts

    def sync_weights(self) -> dict:
        return ray.get([w.sync_weights.remote(self.engines) for w in self.workers])[0]

    def engines_sleep(self, sleep: bool) -> None:
        """Colocated engines give their GPU memory to the trainer between rollouts."""
        if self.cfg.rollout.colocate:
            ray.get([e.sleep.remote() if sleep else e.wake_up.remote() for e in self.engines])

    def save(self) -> None:
        tag = f"step_{self.step}"
        step_dir = self.checkpointer.root / tag
        ray.get([worker.save.remote(str(step_dir)) for worker in self.workers])
        state = {"step": self.step, "prompts": self.loader.state_dict(), "rng": rng_state()}
        torch.save(state, step_dir / "driver.pt")
        self.checkpointer.publish(tag)
