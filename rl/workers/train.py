"""A training rank, as a Ray actor: its shards of the policy and of the critic, each a DeepSpeed ZeRO-3
engine over the same process group (gloo on the CPU, NCCL on GPUs).

The driver hands every rank the same number of responses; the ranks cut them into micro-batches by a token
budget and agree on their number, so all make the same forward passes and collectives (rl/micro_batches.py).
Losses are divided by counts of the whole minibatch (all ranks), handed in by the driver. Under sequence
parallelism (`policy.sequence_parallel`) the ranks of a group hold the same responses and each runs a slice
of every row through the decoder (DeepSpeed Ulysses, step3vl_train/model/sequence.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from rl.algos.losses import GlobalCounts, policy_loss, value_loss
from rl.config import ModelRoleConfig, RLConfig
from rl.experience import Response, SequenceBatch, sequence_batch, shared_sequence_batch
from rl.feature_cache import ImageFeatureCache, same_tower
from rl.iteration import LOGPROB_SUMS
from rl.micro_batches import agreed_micro_batches, response_rows, shared_row_length
from rl.sync import RaySender, VLLMSender
from step3vl_train.cli import quiet_known_warnings
from step3vl_train.model import Step3VLConfig, Step3VLForConditionalGeneration
from step3vl_train.model.value import Step3VLForValue
from step3vl_train.train.checkpoint import fsync_tree
from step3vl_train.train.distributed import close_distributed, init_distributed
from step3vl_train.train.engine import Engine, build_engine, deepspeed_config


@dataclass
class ResponseStats:
    """Per response, from the models before the update."""

    old_logprobs: list[torch.Tensor] | None  # None in an on-policy update: its own forward gives them
    values: list[torch.Tensor] | None
    entropy_sum: float  # summed over valid response tokens
    image_cache: dict[str, float] = field(default_factory=dict)  # ImageFeatureCache.stats


@dataclass
class ForwardRows:
    """One forward's rows."""

    indices: list[int]  # of the responses, into the list they came from, in the rows' order
    responses: list[Response]  # in the rows' order: the order of the batch's per-response vectors
    heads: list[Response]  # each row's first: whose prompt (and images) the row holds
    sequences: SequenceBatch


class TrainWorker:
    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, config: dict, pad_token_id: int):
        quiet_known_warnings()  # an actor's process does not inherit the driver's filters
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )  # fmt: skip
        init_distributed()
        self.rank = rank
        self.cfg = RLConfig.from_dict(config)
        self.model_config = Step3VLConfig.from_dict(self.cfg.model)
        self.bf16 = self.cfg.trainer.use_bf16
        self.pad_token_id = pad_token_id
        self.minibatch_per_rank = self.cfg.minibatch_per_rank
        # What no checkpoint gives (the critic's value head) starts the same in every run and on every rank.
        torch.manual_seed(self.cfg.trainer.seed)
        self.policy = self._build(self.cfg.policy, self.cfg.policy.init_from)
        self.sender: RaySender | VLLMSender | None = None
        self.critic = None
        if self.cfg.uses_critic:
            self.critic = self._build(self.cfg.critic, self.cfg.critic.init_from or self.cfg.policy.init_from, True)
        self._feature_caches()

    def _feature_caches(self) -> None:
        """The caches of tower features each model reads (rl/feature_cache.py), None where off: the critic
        reads the policy's where both towers hold the same weights (the same init_from), else its own.
        A collective (the towers' comparison)."""
        policy, critic = self.cfg.policy, self.cfg.critic
        self.policy_features = (
            ImageFeatureCache(self.policy.model, policy.image_feature_cache_mb, "policy")
            if policy.image_feature_cache_mb
            else None
        )
        self.critic_features = None
        if self.critic is not None and critic.image_feature_cache_mb:
            device = self.critic.engine.device
            if self.policy_features is not None and same_tower(self.policy.model, self.critic.model, device):
                self.critic_features = self.policy_features
            else:
                self.critic_features = ImageFeatureCache(self.critic.model, critic.image_feature_cache_mb, "critic")

    def _caches(self) -> list[ImageFeatureCache]:
        """Each distinct cache once, the policy's first: every rank fills them in the same order."""
        caches = [self.policy_features]
        if self.critic_features is not self.policy_features:
            caches.append(self.critic_features)
        return [cache for cache in caches if cache is not None]

    def _build(self, role: ModelRoleConfig, init_from: str | None, critic: bool = False) -> Engine:
        # Micro-batches vary in rows and in number (a token budget, rl/micro_batches.py), so DeepSpeed's own
        # counts are nominal: each micro-batch sets the accumulation boundary itself (_train_micro_batches).
        ds_config = deepspeed_config(self.cfg.deepspeed, 1, 1, role.grad_clip, self.bf16)
        model_class = Step3VLForValue if critic else Step3VLForConditionalGeneration
        engine = build_engine(
            self.model_config, role.optim, ds_config, init_from, model_class, tuple(role.freeze), self.cfg.compute,
            role.sequence_parallel, self.cfg.algo.shared_prompt,
        )  # fmt: skip
        if role.gradient_checkpointing:
            engine.model.gradient_checkpointing_enable()
        return engine

    def _micro_batches(self, responses: list[Response], budget: int) -> list[list[list[int]]]:
        """`responses` in forwards of at most `budget` padded tokens, as many forwards as any rank needs (a
        collective: ZeRO-3 gathers parameters in every forward): each forward its rows, each row the indices
        of its responses (one, or with algo.shared_prompt a group's, after one copy of their prompt)."""
        prompts = [len(r.prompt.sample.input_ids) for r in responses]
        lengths = [r.length for r in responses]
        rows = response_rows(
            [(r.group, r.prompt.key) for r in responses], prompts, lengths, budget, self.cfg.algo.shared_prompt
        )

        def row_length(row: list[int]) -> int:
            return shared_row_length(prompts[row[0]], [lengths[i] for i in row])

        return agreed_micro_batches(rows, row_length, budget, self.policy.engine.device)

    # ---- scoring before the update -------------------------------------------------------------------

    def score(self, responses: list[Response], temperature: float) -> ResponseStats:
        """The trainer's log-probs of each response token (and the critic's values), without gradients;
        in an on-policy update (`RLConfig.on_policy_update`) no log-probs: the update's forward gives them.
        First the tower features of the responses' image prompts, once each, for this iteration's forwards.
        A collective: every rank holds the same number of responses (the same ones as in `update`)."""
        engine = self.policy.engine
        for cache in self._caches():
            cache.reset()
            cache.fill(responses, engine.device, engine.module.dtype)
        logprobs: list | None = None
        entropy_sum = 0.0
        if not self.cfg.on_policy_update:
            logprobs = [None] * len(responses)
            for rows in self._micro_batches(responses, self.cfg.policy.micro_batch_tokens):
                forward = self._forward_rows(responses, rows)
                sequences = forward.sequences
                with torch.no_grad():
                    token_logprobs, token_entropy = self._scores(forward, temperature, with_entropy=True)
                for index, row in zip(forward.indices, sequences.gather(token_logprobs.cpu()), strict=True):
                    logprobs[index] = row
                token_entropy = token_entropy.cpu() * sequences.response_mask
                valid = sequences.scatter([torch.full((r.length,), float(r.valid)) for r in forward.responses])
                entropy_sum += float((token_entropy * valid).sum())
        values: list | None = None
        if self.critic is not None:
            values = [None] * len(responses)
            for rows in self._micro_batches(responses, self.cfg.critic.micro_batch_tokens):
                forward = self._forward_rows(responses, rows)
                with torch.no_grad():
                    out = self.critic.engine(**self._inputs(forward, self.critic_features))
                for index, row in zip(forward.indices, forward.sequences.gather(out[:, :-1].cpu()), strict=True):
                    values[index] = row
        cache = self.policy_features or self.critic_features
        return ResponseStats(logprobs, values, entropy_sum, cache.stats() if cache is not None else {})

    # ---- the update -----------------------------------------------------------------------------------

    def update(self, responses: list[Response], counts: list[GlobalCounts]) -> dict[str, float]:
        """One optimizer step of the policy (and the critic) per minibatch: this rank's share of each of
        `len(counts)` minibatches, in order, the responses it scored. Returns sums over this rank, for the
        driver to add up; in an on-policy update also the entropy and log-prob sums that the scoring pass
        gives otherwise (`LOGPROB_SUMS`; `mismatch_max` a maximum)."""
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_tokens": 0.0, "approx_kl": 0.0}
        sums |= dict.fromkeys(LOGPROB_SUMS, 0.0)
        for index, minibatch_counts in enumerate(counts):
            minibatch = responses[index * self.minibatch_per_rank : (index + 1) * self.minibatch_per_rank]
            for name, value in self._policy_step(minibatch, minibatch_counts).items():
                sums[name] = max(sums[name], value) if name == "mismatch_max" else sums[name] + value
            if self.critic is not None:
                sums["value_loss"] += self._critic_step(minibatch, minibatch_counts)
        sums["policy_grad_norm"] = float(self.policy.engine.get_global_grad_norm() or 0.0)
        for cache in self._caches():
            cache.reset()  # the memory goes back before the next rollout (colocated engines wake up)
        return sums

    def _train_micro_batches(
        self, engine: deepspeed.DeepSpeedEngine, minibatch: list[Response], budget: int
    ) -> Iterator[ForwardRows]:
        """Yields the minibatch's micro-batches for the caller to run forward and `engine.backward` on, then
        makes the minibatch's one optimizer step. The boundary is set before each forward: False accumulates
        (ZeRO-3 reduce-scatters each backward's gradients into the fp32 partitions), True on the last makes
        `engine.step()` update and zero them. DeepSpeed's own count (gradient_accumulation_steps) would step
        mid-minibatch where the number of micro-batches varies."""
        forwards = self._micro_batches(minibatch, budget)
        for position, rows in enumerate(forwards):
            engine.set_gradient_accumulation_boundary(position == len(forwards) - 1)
            yield self._forward_rows(minibatch, rows)
        engine.step()

    def _backward_scale(self) -> float:
        """ZeRO-3 averages gradients over every rank; under sequence parallelism the ranks of a group compute
        the same loss from the whole rows (LocalSequence.to_batch), whose gradient reaches each slice once
        from every rank of the group."""
        return dist.get_world_size() / self.cfg.sequence_parallel

    def _policy_step(self, minibatch: list[Response], counts: GlobalCounts) -> dict[str, float]:
        algo, scale, engine = self.cfg.algo, self._backward_scale(), self.policy.engine
        on_policy = self.cfg.on_policy_update
        out = {"policy_loss": 0.0, "clip_tokens": 0.0, "approx_kl": 0.0}
        out |= dict.fromkeys(LOGPROB_SUMS, 0.0)
        for forward in self._train_micro_batches(engine, minibatch, self.cfg.policy.micro_batch_tokens):
            chunk, sequences = forward.responses, forward.sequences
            mask = sequences.scatter([r.trained_mask() for r in chunk])
            token_logprobs, token_entropy = self._scores(forward, self.cfg.rollout.temperature, on_policy)
            device = token_logprobs.device
            mask = mask.to(device)
            rollout = sequences.scatter([torch.tensor(r.completion.logprobs) for r in chunk]).to(device)
            behind = sequences.scatter([r.behind_mask() for r in chunk]).to(device)
            if on_policy:  # the policy has not moved since the rollout: these are the old log-probs
                old = token_logprobs.detach()
                gap, fresh = (rollout - old).abs(), mask * (1 - behind)
                out["entropy_sum"] += float((token_entropy * mask).sum())
                out["mismatch_sum"] += float((gap * fresh).sum())
                out["mismatch_max"] = max(out["mismatch_max"], float((gap * fresh).max()))
                out["mismatch_tokens"] += float(fresh.sum())
                out["gap_sum"] += float((gap * mask * behind).sum())
                out["gap_tokens"] += float((mask * behind).sum())
            else:
                old = sequences.scatter([r.old_logprobs for r in chunk]).to(device)
            if any(r.behind for r in chunk):  # an older policy's tokens: the ratio, and the clip, against it
                old = torch.where(behind.bool(), rollout, old)
            loss, stats = policy_loss(
                token_logprobs,
                old,
                rollout,
                sequences.scatter([r.advantages for r in chunk]).to(device),
                mask,
                counts,
                algo.clip_low,
                algo.clip_high,
                algo.tis_cap,
                algo.loss_aggregation,
                responses_of(sequences, device),
            )
            engine.backward(loss * scale, scale_wrt_gas=False)
            out["policy_loss"] += loss.item()
            out["clip_tokens"] += float(stats["clip_fraction"])
            out["approx_kl"] += float(stats["approx_kl"])
        return out

    def _critic_step(self, minibatch: list[Response], counts: GlobalCounts) -> float:
        scale, engine, total = self._backward_scale(), self.critic.engine, 0.0
        for forward in self._train_micro_batches(engine, minibatch, self.cfg.critic.micro_batch_tokens):
            chunk, sequences = forward.responses, forward.sequences
            mask = sequences.scatter([r.trained_mask() for r in chunk])
            values = engine(**self._inputs(forward, self.critic_features))[:, :-1]
            device = values.device
            loss = value_loss(
                values,
                sequences.scatter([r.values for r in chunk]).to(device),
                sequences.scatter([r.returns for r in chunk]).to(device),
                mask.to(device),
                counts,
                self.cfg.algo.value_clip,
                self.cfg.algo.loss_aggregation,
                responses_of(sequences, device),
            )
            engine.backward(loss * scale, scale_wrt_gas=False)
            total += loss.item()
        return total

    def _forward_rows(self, responses: list[Response], rows: list[list[int]]) -> ForwardRows:
        indices = [index for row in rows for index in row]
        if self.cfg.algo.shared_prompt or self.cfg.sequence_parallel > 1:  # packed rows (Ulysses takes no others)
            tokens = [[responses[i].completion.token_ids for i in row] for row in rows]
            prompts = [responses[row[0]].prompt.sample for row in rows]
            sequences = shared_sequence_batch(list(zip(prompts, tokens, strict=True)), self.pad_token_id)
        else:
            items = [(responses[i].prompt.sample, responses[i].completion.token_ids) for i in indices]
            sequences = sequence_batch(items, self.pad_token_id)
        return ForwardRows(indices, [responses[i] for i in indices], [responses[row[0]] for row in rows], sequences)

    def _scores(
        self, forward: ForwardRows, temperature: float, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The policy's log-probs (and entropy) of the response tokens, (B, L-1) aligned with
        `response_mask`: the head runs on response positions only, `compute.loss_chunk` at a time."""
        out = self.policy.engine(
            **self._inputs(forward, self.policy_features),
            labels=forward.sequences.response_labels().to(self.policy.engine.device),
            logprobs_temperature=temperature,
            return_entropy=with_entropy,
        )
        return out.logprobs[:, :-1], out.entropy[:, :-1] if with_entropy else None

    def _inputs(self, forward: ForwardRows, cache: ImageFeatureCache | None) -> dict:
        """The model's inputs for these rows: the cached tower features of their images in place of the
        pixels where `cache` has them all."""
        engine = self.policy.engine
        features = cache.batch(forward.heads) if cache is not None else None
        batch = forward.sequences.batch if features is None else replace(forward.sequences.batch, pixels=None)
        inputs = batch.model_inputs(with_labels=False, device=engine.device, pixel_dtype=engine.module.dtype)
        return inputs if features is None else {**inputs, "image_features": features}

    # ---- weight sync ----------------------------------------------------------------------------------

    def sync_weights(self, engines: list, everything: bool) -> dict[str, float]:
        """Streams the policy's weights to the rollout engines (a collective of every rank; rl/sync.py):
        every tensor when the engines have just started, else the trainable ones."""
        if self.sender is None:
            rollout, bucket_bytes = self.cfg.rollout, self.cfg.rollout.sync_bucket_mb * 2**20
            if rollout.engine == "vllm":
                from rl.workers.group import rendezvous_address  # Ray's: only the vLLM path needs it

                address, port = rendezvous_address()
                self.sender = VLLMSender(
                    self.policy.model, engines, self.rank, bucket_bytes, rollout.weight_transfer,
                    rollout.tensor_parallel_size, address, port,
                )  # fmt: skip
            else:
                self.sender = RaySender(self.policy.model, engines, self.rank, bucket_bytes)
        return self.sender.send(everything)

    # ---- checkpoints ----------------------------------------------------------------------------------

    def save(self, step_dir: str) -> None:
        """Collective: the policy's and the critic's ZeRO-3 shards and optimizer states into `step_dir`."""
        self.policy.engine.save_checkpoint(step_dir, tag="policy", save_latest=False)
        if self.critic is not None:
            self.critic.engine.save_checkpoint(step_dir, tag="critic", save_latest=False)
        fsync_tree(Path(step_dir))  # each machine flushes what it wrote before the driver publishes
        dist.barrier()

    def load(self, step_dir: str) -> None:
        self.policy.engine.load_checkpoint(step_dir, tag="policy")
        if self.critic is not None:
            self.critic.engine.load_checkpoint(step_dir, tag="critic")
        self._feature_caches()  # the towers' weights are the checkpoint's now

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        close_distributed()


def responses_of(sequences: SequenceBatch, device: torch.device) -> torch.Tensor | None:
    index = sequences.response_index
    return index.to(device) if index is not None else None
