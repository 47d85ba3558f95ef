"""One training rank of tests/rl/test_sequence_parallel.py: python -m tests.rl.sequence_parallel_run RANK PORT OUT
(OUT/world: 1 or 2, the ranks of this run, sharing every row where 2; OUT/init: the tiny model to start from).

TrainWorker scores and updates one iteration of 3 prompts (2 with images, one of them with 6 crops, and a
text prompt) x 4 responses of unequal length, in micro-batches of at most 160 tokens, from the same weights
in each run:
- rows: a row a response;
- shared: each prompt's responses in shared rows (algo.shared_prompt), the tower's features cached;
- shared_pixels: shared rows, no cache (each rank's tower runs on the views of its slice).
Each records the scores, the update's sums, every gradient (gathered whole) and the tokens its policy's
decoder took.
"""

import random
import sys
from pathlib import Path

import torch

from rl.experience import Completion, Response
from rl.iteration import minibatches, rank_shares
from tests.rl.ranks import record_gradients, stop_recording
from tests.rl.test_engines import image_prompt, text_prompt

REPO = Path(__file__).resolve().parents[2]
N = 4
RUNS = {"rows": (False, 1024), "shared": (True, 1024), "shared_pixels": (True, 0)}  # shared rows, cache MiB


def iteration(processor) -> list[Response]:
    prompts = [image_prompt(processor, (200, 150), "A?"), image_prompt(processor, (400, 300), "C?")]
    prompts.append(text_prompt(processor))
    rng = random.Random(0)
    responses = []
    for group, prompt in enumerate(prompts):
        prompt.key = f"shard.tar:{group}"
        for _ in range(N):
            tokens = [rng.randint(11, 1000) for _ in range(rng.randint(3, 30))]
            response = Response(group, prompt, Completion(tokens, [-rng.random() * 3 for _ in tokens], "stop"))
            response.advantages = torch.tensor([rng.gauss(0, 1) for _ in tokens])
            response.returns = torch.tensor([rng.gauss(0, 1) for _ in tokens])
            responses.append(response)
    return responses


def record(worker, rank: int, world: int, responses: list[Response]) -> dict:
    engines = {"policy": worker.policy, "critic": worker.critic}
    decoded = []  # tokens through the policy's decoder, each forward

    def count(_module, _args, kwargs):
        decoded.append(kwargs["inputs_embeds"].shape[:2].numel())

    hook = worker.policy.model.model.register_forward_pre_hook(count, with_kwargs=True)
    grads = record_gradients(engines)
    share = rank_shares(responses, world, world)[rank]
    stats = worker.score(share, 1.0)
    for index, response in enumerate(share):
        response.old_logprobs, response.values = stats.old_logprobs[index], stats.values[index]
    shards, counts = minibatches(worker.cfg, responses, step=1, world=world)
    sums = worker.update(shards[rank], counts)
    stop_recording(engines)
    hook.remove()
    return {
        "decoded": sum(decoded),
        "old_logprobs": stats.old_logprobs,
        "values": stats.values,
        "entropy_sum": stats.entropy_sum,
        "sums": sums,
        "grads": grads,
    }


def main(rank: int, port: int, out: Path) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rl.workers.train import TrainWorker
    from step3vl_train.processing.processor import load_processor
    from step3vl_train.train.recipes import register_recipes

    world = int((out / "world").read_text())
    overrides = [
        "stage=rlvr", "model=tiny", "processor=tiny", "tokenizer=tiny", "prompts.train=unused.tar",
        "prompts.prompts_per_step=3", f"rollout.n={N}", "algo.minibatches=2", "algo.estimator=gae",
        "policy.micro_batch_tokens=160", "critic.micro_batch_tokens=160", "policy.grad_clip=0", "critic.grad_clip=0",
        f"trainer.world_size={world}", f"policy.sequence_parallel={world}", f"policy.init_from={out.parent / 'init'}",
    ]  # fmt: skip
    register_recipes()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        config = OmegaConf.to_container(compose("rl", overrides), resolve=True)
    torch.manual_seed(0)
    worker = TrainWorker(rank, world, "127.0.0.1", port, config, pad_token_id=0)
    processor = load_processor("tiny", str(REPO / "configs/processor/tiny.yaml"))
    worker.save(str(out / "initial"))
    results = {}
    for name, (shared, cache) in RUNS.items():
        worker.cfg.algo.shared_prompt = shared
        worker.cfg.policy.image_feature_cache_mb = worker.cfg.critic.image_feature_cache_mb = cache
        worker.load(str(out / "initial"))  # rebuilds the caches
        results[name] = record(worker, rank, world, iteration(processor))
    torch.save(results, out / f"rank{rank}.pt")
    worker.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
