"""RL on the CPU: each phase's share of an iteration, the driver's own overhead, and weight-sync time as
the model grows. Runs `rl/run.py` (2 ZeRO-3 ranks over gloo, the transformers engine, Ray) and reads the
timings it logs in metrics.jsonl.

python benchmarks/rl_cpu.py phases [--steps 10]
python benchmarks/rl_cpu.py sync [--sizes 64:2:128 256:4:1024 512:8:2048 1024:12:4096 1024:12:4096:768:12]
python benchmarks/rl_cpu.py engine [--lengths 64 256 1024]
python benchmarks/rl_cpu.py shared [--repeats 5] [--layers 8]

`phases`: the tiny model on the synthetic RL prompts (images), 8 prompts x 4 responses of up to 48 tokens,
PPO with the critic. The first iteration is left out (warm-up). `sync`: the decoder at hidden:layers:ffn,
critic-free GRPO on 2 prompts x 2 responses of 4 tokens, so that the sync is what varies; the vision
tower scaled too where a size names it. The first sync (every tensor) and each iteration's (the trainable
ones: the vision tower stays frozen), the median time of iterations 2 and 3. `engine`: the transformers
engine alone, the tiny model with Qwen3's 151,936-token vocabulary, 8 responses of exactly N tokens; the
growth of peak RSS over generation after a short warm-up one, in a fresh process per length, beside the
logits that keeping every step's would take. `shared`: a group's shared prompt computed once
(algo.shared_prompt) against a row a response, in TrainWorker's scoring and update (one rank, ZeRO-3 over
gloo, PPO with the critic, the tiny model) on PaCoRe's shape (16 responses to one prompt, prompt:response
3:1) and RLVR's (1:5); the median time of `--repeats` from the same weights (the two ways in turn), and how
far the results differ.
Each mode prints a Markdown table.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from step3vl_train.data.synthetic import write_corpus

REPO = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "reward", "score", "update", "sync")


def run_rl(out: Path, corpus: Path, *overrides: str) -> list[dict]:
    command = [
        sys.executable, str(REPO / "rl" / "run.py"), "stage=rlvr", "model=tiny", "processor=tiny", "tokenizer=tiny",
        "logging.mode=disabled", f"prompts.root={corpus}", f"trainer.output_dir={out}", "trainer.save_every=1000",
        "policy.from_scratch=true", *overrides,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def phases(args, corpus: Path, work: Path) -> None:
    rows = run_rl(work / "phases", corpus, "prompts.prompts_per_step=8", "rollout.n=4", "algo.minibatches=2",
                  "policy.micro_batch_tokens=4096", "critic.micro_batch_tokens=4096", "rollout.max_new_tokens=48",
                  f"trainer.max_steps={args.steps}")[1:]  # fmt: skip
    step = statistics.median(r["time/step"] for r in rows)
    print("| phase | median s | share of the iteration |\n|---|---|---|")
    for phase in PHASES:
        seconds = statistics.median(r[f"time/{phase}"] for r in rows)
        print(f"| {phase} | {seconds:.3f} | {seconds / step:.1%} |")
    driver = statistics.median(r["time/step"] - sum(r[f"time/{p}"] for p in PHASES) for r in rows)
    print(f"| driver (advantages, sharding, logging, Ray calls) | {driver:.3f} | {driver / step:.1%} |")
    print(f"| iteration | {step:.3f} | 100% |")


def sync(args, corpus: Path, work: Path) -> None:
    print(
        "| model hidden:layers:ffn[:vision width:layers] | parameters (frozen) | first sync | each iteration's |"
        " tensors first / each | sync s | MB/s |\n|---|---|---|---|---|---|---|"
    )
    for size in args.sizes:
        hidden, layers, ffn, *vision = (int(x) for x in size.split(":"))
        heads = max(4, hidden // 128)
        overrides = [
            f"model.text_config.hidden_size={hidden}", f"model.text_config.num_hidden_layers={layers}",
            f"model.text_config.max_window_layers={layers}", f"model.text_config.intermediate_size={ffn}",
            f"model.text_config.num_attention_heads={heads}", f"model.text_config.num_key_value_heads={heads // 2}",
            f"model.text_config.head_dim={hidden // heads}",
        ]  # fmt: skip
        if vision:
            overrides += [f"model.vision_config.width={vision[0]}", f"model.vision_config.layers={vision[1]}",
                          f"model.vision_config.heads={max(4, vision[0] // 64)}"]  # fmt: skip
        rows = run_rl(
            work / f"sync_{size.replace(':', '_')}", corpus, "prompts.prompts_per_step=2", "rollout.n=2",
            "algo.minibatches=1", "policy.micro_batch_tokens=1024", "algo.estimator=grpo", "critic.enabled=false",
            "rollout.max_new_tokens=4", "trainer.max_steps=3", *overrides,
        )  # fmt: skip
        first, later = rows[0], rows[1:]
        seconds = statistics.median(r["sync/s"] for r in later)
        sent, everything = later[-1]["sync/bytes"], first["sync_start/bytes"]
        frozen = (everything - sent) / 4 / 1e6
        tensors = f"{first['sync_start/tensors']:.0f} / {later[-1]['sync/tensors']:.0f}"
        sizes = f"{everything / 4 / 1e6:.1f}M ({frozen:.1f}M) | {everything / 1e6:.0f} MB | {sent / 1e6:.0f} MB"
        print(f"| {size} | {sizes} | {tensors} | {seconds:.3f} | {sent / 1e6 / seconds:.0f} |")


QWEN3_VOCAB = 151_936
ENGINE_BATCH = 8


def engine(args) -> None:
    print("| new tokens | peak RSS growth | every step's fp32 logits | generate s |\n|---|---|---|---|")
    for length in args.lengths:
        command = [sys.executable, __file__, "engine-one", "--lengths", str(length)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        if done.returncode != 0:
            sys.exit(done.stderr[-3000:])
        result = json.loads(done.stdout.splitlines()[-1])
        logits = ENGINE_BATCH * length * QWEN3_VOCAB * 4
        print(f"| {length} | {result['growth'] / 2**20:.0f} MiB | {logits / 2**20:.0f} MiB | {result['seconds']:.1f} |")


def engine_one(length: int) -> None:
    """In its own process, so that the peak RSS is this generation's."""
    from omegaconf import OmegaConf

    from rl.engines import SamplingParams
    from rl.engines.hf import HFEngine
    from rl.experience import Prompt
    from step3vl_train.processing.processor import load_processor

    model = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml"))
    model["text_config"]["vocab_size"] = QWEN3_VOCAB
    rollout = HFEngine(model, None, pad_token_id=0, batch_size=ENGINE_BATCH)
    processor = load_processor("tiny", str(REPO / "configs" / "processor" / "tiny.yaml"))
    messages = [{"role": "user", "content": "Count to ten."}]
    prompt = Prompt("k", "t", processor(messages, add_generation_prompt=True), messages, [], "math")
    rollout.generate([prompt], SamplingParams(n=ENGINE_BATCH, max_new_tokens=16), seed=1)  # allocator warm-up
    sampling = SamplingParams(n=ENGINE_BATCH, max_new_tokens=length)  # no stop tokens: every response is full
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    [completions] = rollout.generate([prompt], sampling, seed=0)
    seconds = time.perf_counter() - started
    assert all(len(c.token_ids) == len(c.logprobs) == length for c in completions)
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"growth": growth, "seconds": seconds}))


SHAPES = {"PaCoRe (3:1)": (768, 256), "RLVR (1:5)": (128, 640)}  # prompt tokens, mean response tokens
GROUP = 16
BUDGET = 2048  # micro_batch_tokens: about the longest sequence, as the recipes size it


def shared_prompts(args, work: Path) -> None:
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rl.algos.losses import GlobalCounts
    from rl.experience import Completion, Prompt, Response
    from rl.micro_batches import response_rows, shared_row_length
    from rl.workers.train import TrainWorker
    from step3vl_train.processing.processor import load_processor
    from step3vl_train.train.distributed import free_port
    from step3vl_train.train.recipes import register_recipes

    register_recipes()
    overrides = ["stage=rlvr", "model=tiny", "processor=tiny", "tokenizer=tiny", "prompts.train=unused.tar",
                 "rollout.n=16", "prompts.prompts_per_step=1", "algo.minibatches=2", "algo.estimator=gae",
                 f"policy.micro_batch_tokens={BUDGET}", f"critic.micro_batch_tokens={BUDGET}",
                 f"model.text_config.num_hidden_layers={args.layers}",
                 f"model.text_config.max_window_layers={args.layers}"]  # fmt: skip
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        config = OmegaConf.to_container(compose("rl", overrides), resolve=True)
    torch.manual_seed(0)
    worker = TrainWorker(0, 1, "127.0.0.1", free_port(), config, pad_token_id=0)
    processor = load_processor("tiny", str(REPO / "configs" / "processor" / "tiny.yaml"))
    worker.save(str(work / "initial"))
    print(
        "| shape | prompt + responses | forward tokens, a row each / shared | forwards a pass | a row each s | "
        "shared s | ratio | max abs. difference (log-probs, values, losses) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (prompt_tokens, mean) in SHAPES.items():
        messages = [{"role": "user", "content": "hello there " * ((prompt_tokens - 14) // 4)}]
        prompt = Prompt("k", "t", processor(messages, add_generation_prompt=True), messages, [], "math")
        generator = torch.Generator().manual_seed(0)
        lengths = torch.randint(mean // 2, mean * 3 // 2 + 1, (GROUP,), generator=generator).tolist()
        responses = []
        for length in lengths:
            tokens = torch.randint(11, 1000, (length,), generator=generator).tolist()
            logprobs = (-torch.rand(length, generator=generator)).tolist()
            response = Response(0, prompt, Completion(tokens, logprobs, "stop"))
            response.advantages, response.returns = torch.randn(length, generator=generator), torch.randn(length)
            responses.append(response)
        half = GROUP // 2  # two minibatches: the scoring pass gives the old log-probs
        counts = [GlobalCounts(sum(lengths[:half]), half), GlobalCounts(sum(lengths[half:]), half)]
        times, outcome, forwards = {False: [], True: []}, {}, []
        for shared in (False, True):
            worker.cfg.algo.shared_prompt = shared
            forwards.append(len(worker._micro_batches(responses, BUDGET)))
        for _ in range(args.repeats):  # the two ways in turn, so that the machine's drift falls on both
            for shared in (False, True):
                worker.cfg.algo.shared_prompt = shared
                worker.load(str(work / "initial"))
                started = time.perf_counter()
                stats = worker.score(responses, 1.0)
                for response, old, values in zip(responses, stats.old_logprobs, stats.values, strict=True):
                    response.old_logprobs, response.values = old, values
                sums = worker.update(responses, counts)
                times[shared].append(time.perf_counter() - started)
                outcome[shared] = (stats, sums)
        plain, shared = [(statistics.median(times[s]), *outcome[s]) for s in (False, True)]
        difference = max(
            max(float((a - b).abs().max()) for a, b in zip(plain[1].old_logprobs, shared[1].old_logprobs, strict=True)),
            max(float((a - b).abs().max()) for a, b in zip(plain[1].values, shared[1].values, strict=True)),
            abs(plain[2]["policy_loss"] - shared[2]["policy_loss"]),
            abs(plain[2]["value_loss"] - shared[2]["value_loss"]),
        )
        prompt_length = len(prompt.sample.input_ids)
        rows = response_rows([0] * GROUP, [prompt_length] * GROUP, lengths, BUDGET, shared=True)
        tokens_shared = sum(shared_row_length(prompt_length, [lengths[i] for i in row]) for row in rows)
        print(f"| {name} | {prompt_length} + {GROUP} x {statistics.mean(lengths):.0f} | "
              f"{GROUP * prompt_length + sum(lengths):,} / {tokens_shared:,} | {forwards[0]} / {forwards[1]} | "
              f"{plain[0]:.2f} | {shared[0]:.2f} | "
              f"{shared[0] / plain[0]:.2f}x | {difference:.1e} |")  # fmt: skip
    worker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["phases", "sync", "engine", "engine-one", "shared"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=8, help="shared: decoder layers of the tiny model")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--sizes", nargs="+", default=["64:2:128", "256:4:1024", "512:8:2048", "1024:12:4096", "1024:12:4096:768:12"]
    )
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 256, 1024])
    args = parser.parse_args()
    if args.mode == "engine":  # needs no corpus
        return engine(args)
    if args.mode == "engine-one":
        return engine_one(args.lengths[0])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.mode == "shared":
            return shared_prompts(args, work)
        corpus = work / "rl"
        write_corpus("rl", str(corpus), num=200, seed=0, shard_size=10)
        (phases if args.mode == "phases" else sync)(args, corpus, work)


if __name__ == "__main__":
    main()
