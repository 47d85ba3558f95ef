"""Our trainer and RL loop against the libraries a user would otherwise pick, side by side in one run on the
CPU: transformers' Trainer + DeepSpeed ZeRO-3 for a pre-training step, TRL's GRPOTrainer for an RL
iteration and for the reward it reaches; and the ViT calls an RL iteration makes on image prompts.

bash benchmarks/peers/setup.sh        # once: .venv-peers, the same libraries as .venv plus TRL and py-spy
python benchmarks/peers_cpu.py [all|pretrain|rl|reward|vit|profile|staleness] [--rounds 2] [--work DIR] [--json FILE]

Our side runs from this interpreter (the project's .venv) through the public entry points, torchrun
launch/pretrain.py and rl/run.py, and reads their metrics.jsonl. The peers run in .venv-peers
(`--peers-python`) from files our side writes under WORK: our tiny tokenizer, our decoder's shape and
starting weights as a plain Qwen3ForCausalLM, the same documents and prompts. Every process runs one torch
thread (torchrun and Ray set so for ours; the peers are given the same). Timings are medians after
WARMUP steps; `--rounds N` runs the sides in turn N times and keeps each side's best round, against other
work on the machine. Each measure prints the 1-minute load average before and after it.

- pretrain: the tiny decoder (2 layers x 64), 2 ranks, ZeRO-3, text only, 4 rows of 256 tokens a rank a
  step, one micro-batch. Ours: launch/pretrain.py (the whole model, vision tower included) on the
  synthetic corpus's text documents. Theirs: peers/hf_pretrain.py on the same documents, tokenised.
- rl: GRPO, 4 prompts x 8 responses of at most 4 new tokens, one minibatch, one epoch (exactly on-policy),
  no critic, no KL, on peers/peers_task.py; at the tiny size (ours on 1 and 2 ranks) and at a decoder of
  4 layers x 512 (ffn 2048, 4 heads of 128, 2 KV heads; 17M parameters, where the forward and backward
  are most of an iteration). Theirs: peers/trl_grpo.py, one process.
- reward: that task, 100 iterations at the tiny size and 2 ranks, both sides from the same weights; the
  mean reward of each 10 iterations (why that task: peers_task.py's docstring).
- staleness: `reward`'s run, ours only, at algo.max_staleness 0 and 1 (one step off-policy), both reward
  curves in one plot (WORK/staleness.png); needs no .venv-peers.
- vit: vision tower calls (StepVisionEncoder.forward, counted in every process by
  peers/count_vit/sitecustomize.py) in an RL iteration on image prompts (synthetic `choice`, one image
  each), 16 responses a prompt, PPO with the critic, 4 minibatches, 2 ranks.
- profile: py-spy (sampling every process, idle time included) over our pre-training steps and RL
  iterations at the tiny size: where each step's wall time goes, and the share of the functions the
  issue names (peers/spy.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / "benchmarks" / "peers"
TINY = "64:2:128"
LARGE = "512:4:2048"
PHASES = ("rollout", "reward", "score", "update", "sync")  # our RL metrics' time/<phase>
RL_LR = 1e-2  # both sides: from random weights the task rises within ~60 iterations at this rate (1e-3: not in 100)
WARMUP = 3  # first steps (iterations) of a run left out of the timings: allocator, caches, first syncs


# ---- what both sides read -------------------------------------------------------------------------------


def model_config(size: str) -> dict:
    """configs/model/tiny.yaml with the decoder at hidden:layers:ffn (heads of 128, at least 4, as
    benchmarks/rl_cpu.py scales it)."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml"))
    for key, value in decoder_fields(size).items():
        config["text_config"][key] = value
    return config


def decoder_fields(size: str) -> dict:
    hidden, layers, ffn = (int(x) for x in size.split(":"))
    heads = max(4, hidden // 128)
    return {
        "hidden_size": hidden, "num_hidden_layers": layers, "max_window_layers": layers, "intermediate_size": ffn,
        "num_attention_heads": heads, "num_key_value_heads": heads // 2, "head_dim": hidden // heads,
    }  # fmt: skip


def decoder_overrides(size: str) -> list[str]:
    return [f"model.text_config.{key}={value}" for key, value in decoder_fields(size).items()]


def write_weights(work: Path, size: str) -> tuple[Path, Path]:
    """One random initialisation (seed 0) in two layouts: ours (released format, for `init_from`) and its
    decoder as a plain Qwen3ForCausalLM (the peers'), so that both sides start from the same weights."""
    ours, theirs = work / f"init_{size.replace(':', '_')}", work / f"qwen3_{size.replace(':', '_')}"
    if (theirs / "config.json").exists():
        return ours, theirs
    import torch
    from transformers import Qwen3ForCausalLM

    from step3vl_train.model import Step3VLConfig, Step3VLForConditionalGeneration

    torch.manual_seed(0)
    model = Step3VLForConditionalGeneration(Step3VLConfig.from_dict(model_config(size)))
    model.save_pretrained(ours)
    decoder = Qwen3ForCausalLM(model.config.text_config)
    decoder.model.load_state_dict(model.model.state_dict())
    decoder.lm_head.load_state_dict(model.lm_head.state_dict())
    decoder.save_pretrained(theirs)
    return ours, theirs


def write_inputs(work: Path, seq_len: int) -> None:
    """The tokenizer, the DeepSpeed config, the pre-training documents (ours read the JSONL, the peers the
    same documents tokenised and cut into rows of seq_len) and the RL prompts (ours as samples, theirs as
    the exact text our processor renders, checked to tokenise back to the same ids)."""
    import numpy as np
    from omegaconf import OmegaConf

    sys.path.insert(0, str(PEERS))
    from peers_task import prompts

    from step3vl_train.data.synthetic import TASKS, make_sample
    from step3vl_train.processing.processor import load_processor

    processor = load_processor("tiny", str(REPO / "configs" / "processor" / "tiny.yaml"))
    tokenizer = processor.tokenizer
    tokenizer.save_pretrained(work / "tokenizer")
    zero3 = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "deepspeed" / "zero3.yaml"))
    (work / "deepspeed.json").write_text(json.dumps(zero3))

    docs, ids = [], []
    tasks = list(TASKS["pretrain"])  # samples take the tasks in turn: every len(tasks)-th is a text document
    for index in range(tasks.index("text"), len(tasks) * 400, len(tasks)):
        task, sample = make_sample("pretrain", index, seed=0)
        assert task == "text", task
        docs.append({"key": f"text-{index:06d}", "text": sample.record["text"]})
        ids += tokenizer(sample.record["text"], add_special_tokens=False).input_ids + [tokenizer.pad_token_id]
    (work / "pretrain_docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    rows = np.array(ids[: len(ids) // seq_len * seq_len], dtype=np.int32).reshape(-1, seq_len)
    np.save(work / "pretrain_rows.npy", rows)

    ours, theirs = [], []
    for index, (text, kind) in enumerate(prompts(512, seed=0)):
        messages = [{"role": "user", "content": text}]
        rendered = processor(messages, add_generation_prompt=True).input_ids
        prompt_text = tokenizer.decode(rendered)
        if tokenizer(prompt_text, add_special_tokens=False).input_ids != list(rendered):
            raise RuntimeError(f"prompt {index} does not tokenise back to our ids: {prompt_text!r}")
        ours.append({"key": f"p{index:05d}", "messages": messages, "answer": kind, "reward": "peers_task:reward"})
        theirs.append({"prompt_text": prompt_text, "answer": kind})
    (work / "rl_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ours))
    (work / "rl_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in theirs))


# ---- running either side --------------------------------------------------------------------------------


def run(command: list[str], log: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Runs `command` from the repository root, one torch thread a process, its output to `log`."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=REPO, env=environment, stdout=handle, stderr=subprocess.STDOUT, text=True)
    print(f"  {log.name}: {time.perf_counter() - started:.0f} s, exit {done.returncode}", file=sys.stderr)
    if check and done.returncode != 0:
        fail(command, log)
    return done


def fail(command: list[str], log: Path) -> None:
    sys.exit(f"{' '.join(command)} failed; the end of {log}:\n" + log.read_text()[-4000:])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def median_after_warmup(values: list[float]) -> float:
    return statistics.median(values[WARMUP:] if len(values) > WARMUP + 2 else values)


def spread(values: list[float]) -> str:
    kept = values[WARMUP:] if len(values) > WARMUP + 2 else values
    ordered = sorted(kept)
    return f"{ordered[len(ordered) // 4]:.3f}-{ordered[3 * len(ordered) // 4]:.3f}"


def torchrun(python: str, ranks: int = 2) -> list[str]:
    return [python, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def our_pretrain_command(
    work: Path, out: Path, steps: int, seq_len: int, batch: int, size: str = TINY, ranks: int = 2
) -> list[str]:
    source = f"[{{name:text,kind:jsonl,paths:[{work / 'pretrain_docs.jsonl'}],weight:1.0}}]"
    return [
        *torchrun(sys.executable, ranks), str(REPO / "launch" / "pretrain.py"), "model=tiny", "processor=tiny",
        "tokenizer=tiny", "logging.mode=disabled", f"data.sources={source}", f"data.packing.seq_len={seq_len}",
        f"data.micro_batch_size={batch}", "data.num_workers=1", "trainer.grad_accum=1", f"trainer.max_steps={steps}",
        "trainer.save_every=0", "trainer.from_scratch=true", f"trainer.output_dir={out}", "optim.lr=1e-3",
        "optim.schedule.warmup_tokens=0", "optim.schedule.shape=constant", *decoder_overrides(size),
    ]  # fmt: skip


def our_rl_command(
    work: Path, out: Path, steps: int, world: int, size: str, init: Path, extra: tuple[str, ...] = ()
) -> list[str]:
    source = f"[{{name:task,kind:jsonl,paths:[{work / 'rl_samples.jsonl'}],weight:1.0}}]"
    return [
        sys.executable, str(REPO / "rl" / "run.py"), "stage=rlvr", "model=tiny", "processor=tiny", "tokenizer=tiny",
        "logging.mode=disabled", f"prompts.sources={source}", f"prompts.root={work}", f"trainer.output_dir={out}",
        f"trainer.save_every={steps + 1}", f"trainer.max_steps={steps}", f"trainer.world_size={world}",
        f"policy.init_from={init}", "prompts.prompts_per_step=4", "rollout.n=8", "rollout.max_new_tokens=4",
        "algo.estimator=grpo", "critic.enabled=false", "algo.minibatches=1", "algo.epochs=1",
        "policy.micro_batch_tokens=4096", f"policy.optim.lr={RL_LR}", "reward.require_reasoning=false",
        *decoder_overrides(size), *extra,
    ]  # fmt: skip


TRUNCATED_SCORED = "reward.truncated_score=null"
_takes_null: list[bool] = []  # learnt from the first run: whether the project takes TRUNCATED_SCORED


def run_ours_rl(
    work: Path, name: str, steps: int, world: int, size: str, extra: tuple[str, ...] = ()
) -> tuple[list[dict], bool]:
    """Our RL run's metrics rows, and whether a response cut at the length limit was scored by the reward
    (`reward.truncated_score=null`; every response of 4 tokens is cut there). Where the project does not
    take null yet, the run goes on with its default (such responses score reward.truncated_score)."""
    init, _ = write_weights(work, size)
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    env = {"PYTHONPATH": os.pathsep.join([str(PEERS), os.environ.get("PYTHONPATH", "")])}
    log = work / f"{name}.log"
    if _takes_null != [False]:
        command = our_rl_command(work, out, steps, world, size, init, (TRUNCATED_SCORED, *extra))
        if run(command, log, env, check=False).returncode == 0:
            _takes_null[:] = [True]
            return metrics(out), True
        if "truncated_score" not in log.read_text():
            fail(command, log)
        _takes_null[:] = [False]
        shutil.rmtree(out, ignore_errors=True)
    run(our_rl_command(work, out, steps, world, size, init, extra), log, env)
    return metrics(out), False


def run_trl(args, work: Path, name: str, steps: int, size: str, seed: int = 0) -> dict:
    _, qwen3 = write_weights(work, size)
    out = work / f"{name}.json"
    command = [args.peers_python, str(PEERS / "trl_grpo.py"), str(work), str(qwen3), str(out), "--steps", str(steps),
               "--seed", str(seed), "--lr", str(RL_LR)]  # fmt: skip
    run(command, work / f"{name}.log", {"OMP_NUM_THREADS": str(args.trl_threads)})
    return json.loads(out.read_text())


# ---- the measures ---------------------------------------------------------------------------------------


def best_round(runs: list[list[float]]) -> dict:
    """Each run's median step after warm-up; the figure is the lowest of them (the round least slowed by
    other work on the machine), with that run's interquartile range."""
    medians = [median_after_warmup(r) for r in runs]
    pick = medians.index(min(medians))
    return {"s": medians[pick], "spread": spread(runs[pick]), "rounds": [round(m, 4) for m in medians]}


def pretrain(args, work: Path) -> dict:
    _, qwen3 = write_weights(work, TINY)
    ours_runs, peer_runs = [], []
    for round_ in range(args.rounds):  # the two sides in turn, so that a busy spell hits both
        out = work / "ours_pretrain"
        shutil.rmtree(out, ignore_errors=True)
        run(our_pretrain_command(work, out, args.steps, args.seq_len, args.batch), work / f"ours_pretrain_{round_}.log")
        rows = [r for r in metrics(out) if "tokens_per_s" in r]
        ours_runs.append([r["step_tokens"] / r["tokens_per_s"] for r in rows])
        theirs_out = work / "hf_pretrain.json"
        command = [*torchrun(args.peers_python), str(PEERS / "hf_pretrain.py"), str(work), str(qwen3),
                   str(theirs_out), "--steps", str(args.steps), "--batch", str(args.batch)]  # fmt: skip
        run(command, work / f"hf_pretrain_{round_}.log")
        peer_runs.append(json.loads(theirs_out.read_text())["step_s"])
    result = {
        "ours": best_round(ours_runs),
        "peer": best_round(peer_runs),
        "ours_tokens_per_step": rows[-1]["step_tokens"],
    }
    result["ratio"] = result["ours"]["s"] / result["peer"]["s"]
    print(f"\n### Pre-training step: 2 ranks, ZeRO-3, text only, {args.batch} x {args.seq_len} tokens a rank; "
          f"the median of steps {WARMUP + 1}-{args.steps} (interquartile range), the best of {args.rounds} "
          "round(s)\n")  # fmt: skip
    print("| decoder | transformers Trainer + DeepSpeed ZeRO-3 | ours | ratio |\n|---|---|---|---|")
    print(f"| {TINY} | {result['peer']['s']:.3f} s ({result['peer']['spread']}) | {result['ours']['s']:.3f} s "
          f"({result['ours']['spread']}) | {result['ratio']:.2f}x |")  # fmt: skip
    if args.rounds > 1:
        print(f"\nEach round's median: peer {result['peer']['rounds']}, ours {result['ours']['rounds']}")
    return result


def rl(args, work: Path) -> dict:
    results = {}
    print("\n### RL iteration: GRPO, 4 prompts x 8 responses, 4 new tokens, one minibatch, one epoch; the median of "
          f"iterations {WARMUP + 1}-N (interquartile range), the best of {args.rounds} round(s)\n")  # fmt: skip
    print("| decoder | TRL GRPOTrainer | ours, 1 rank | ratio | ours, 2 ranks | ratio | truncated scored |")
    print("|---|---|---|---|---|---|---|")
    for size in (TINY, LARGE) if not args.tiny_only else (TINY,):
        steps = args.iterations if size == TINY else max(args.iterations // 2, WARMUP + 3)
        tag = size.replace(":", "_")
        runs: dict[str, list] = {"peer": [], "ours_1": [], "ours_2": []}
        phases: dict[int, list] = {1: [], 2: []}
        for round_ in range(args.rounds):
            runs["peer"].append(run_trl(args, work, f"trl_{tag}_{round_}", steps, size)["step_s"])
            for world in (1, 2):
                rows, scored = run_ours_rl(work, f"ours_rl_{tag}_{world}_{round_}", steps, world, size)
                runs[f"ours_{world}"].append([r["time/step"] for r in rows])
                phases[world].append({p: median_after_warmup([r[f"time/{p}"] for r in rows]) for p in PHASES})
        row = {side: best_round(times) for side, times in runs.items()}
        for world in (1, 2):
            row[f"ratio_{world}"] = row[f"ours_{world}"]["s"] / row["peer"]["s"]
            pick = row[f"ours_{world}"]["rounds"].index(min(row[f"ours_{world}"]["rounds"]))
            row[f"phases_{world}"] = phases[world][pick]
        row["truncated_scored"] = scored
        results[size] = row
        cells = [f"{row['peer']['s']:.3f} s ({row['peer']['spread']})"]
        for world in (1, 2):
            ours = row[f"ours_{world}"]
            cells += [f"{ours['s']:.3f} s ({ours['spread']})", f"{row[f'ratio_{world}']:.1f}x"]
        cells.append("yes" if scored else "no: they score reward.truncated_score")
        print(f"| {size} ({steps} iterations) | " + " | ".join(cells) + " |")
    print("\nOur phases (median s of the round shown):")
    for size, row in results.items():
        for world in (1, 2):
            shown = ", ".join(f"{p} {s:.3f}" for p, s in row[f"phases_{world}"].items())
            print(f"- {size}, {world} rank(s): {shown}")
        if args.rounds > 1:
            rounds = ", ".join(f"{side} {row[side]['rounds']}" for side in ("peer", "ours_1", "ours_2"))
            print(f"- {size}, each round's median: {rounds}")
    return results


def reward(args, work: Path) -> dict:
    n, window = args.reward_iterations, 10
    rows, scored = run_ours_rl(work, "ours_reward", n, 2, TINY)
    ours = [r["reward_mean"] for r in rows]
    trl = run_trl(args, work, "trl_reward", n, TINY)["rewards"]

    def means(curve: list[float]) -> list[float]:
        return [statistics.mean(curve[i : i + window]) for i in range(0, len(curve), window)]

    result = {"iterations": n, "ours": means(ours), "peer": means(trl), "truncated_scored": scored}
    result |= {"ours_last": result["ours"][-1], "peer_last": result["peer"][-1]}
    print(f"\n### Reward over {n} iterations (peers_task.py: lowercase or digits as asked), both from the same "
          f"weights, lr {RL_LR}: the mean of each {window} iterations\n")  # fmt: skip
    spans = [f"{i + 1}-{min(i + window, n)}" for i in range(0, n, window)]
    print("| iterations | " + " | ".join(spans) + " |\n|---|" + "---|" * len(spans))
    print("| TRL GRPOTrainer | " + " | ".join(f"{v:.3f}" for v in result["peer"]) + " |")
    print("| ours (2 ranks) | " + " | ".join(f"{v:.3f}" for v in result["ours"]) + " |")
    if not scored:
        print("\nOurs could not score truncated responses (reward.truncated_score=null is not taken yet): every "
              "4-token response is cut at the limit and scores reward.truncated_score.")  # fmt: skip
    return result


def staleness(args, work: Path) -> dict:
    """`reward`'s task and run, ours only, synchronous (algo.max_staleness=0) and one step off-policy (1):
    the mean reward of each 10 iterations, and both curves in one plot (WORK/staleness.png)."""
    n, window = args.reward_iterations, 10
    curves = {}
    for k in (0, 1):
        rows, _ = run_ours_rl(work, f"ours_staleness_{k}", n, 2, TINY, (f"algo.max_staleness={k}",))
        curves[k] = [r["reward_mean"] for r in rows]
    means = {k: [statistics.mean(c[i : i + window]) for i in range(0, n, window)] for k, c in curves.items()}
    spans = [f"{i + 1}-{min(i + window, n)}" for i in range(0, n, window)]
    print(f"\n### Reward over {n} iterations, ours, synchronous and one step off-policy (the mean of each {window})\n")
    print("| algo.max_staleness | " + " | ".join(spans) + " |\n|---|" + "---|" * len(spans))
    for k, values in means.items():
        print(f"| {k} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4))
    for k, curve in curves.items():
        axes.plot(range(1, n + 1), curve, label=f"algo.max_staleness={k}", alpha=0.8)
    axes.set(xlabel="iteration", ylabel="mean reward", title="peers_task.py, tiny model, 2 ranks")
    axes.legend()
    figure.savefig(work / "staleness.png", dpi=100, bbox_inches="tight")
    print(f"\nplot: {work / 'staleness.png'}")
    return {
        "iterations": n,
        "means": {str(k): v for k, v in means.items()},
        "last": {str(k): v[-1] for k, v in means.items()},
    }


CHOICE = "[{name:choice,paths:[choice/*.tar],weight:1.0}]"


def vit(args, work: Path) -> dict:
    from step3vl_train.data.synthetic import write_corpus

    corpus = work / "rl_images"
    if not corpus.exists():
        write_corpus("rl", str(corpus), num=60, seed=0, shard_size=10)
    counts, out = work / "vit_counts", work / "ours_vit"
    shutil.rmtree(counts, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    counts.mkdir()
    prompts, n, iterations = 2, 16, 2
    init, _ = write_weights(work, TINY)  # the critic starts from the policy's weights, tower included, as in RL
    command = [
        sys.executable, str(REPO / "rl" / "run.py"), "stage=rlvr", "model=tiny", "processor=tiny", "tokenizer=tiny",
        "logging.mode=disabled", f"prompts.root={corpus}", f"prompts.sources={CHOICE}",
        f"trainer.output_dir={out}", f"trainer.save_every={iterations + 1}", f"trainer.max_steps={iterations}",
        f"policy.init_from={init}", f"prompts.prompts_per_step={prompts}", f"rollout.n={n}", "rollout.max_new_tokens=4",
        "policy.micro_batch_tokens=4096", "critic.micro_batch_tokens=4096",
    ]  # fmt: skip
    env = {"PYTHONPATH": os.pathsep.join([str(PEERS / "count_vit"), os.environ.get("PYTHONPATH", "")]),
           "PEERS_VIT_COUNTS": str(counts)}  # fmt: skip
    run(command, work / "ours_vit.log", env)
    calls = [json.loads(line) for f in counts.glob("*.jsonl") for line in f.read_text().splitlines()]
    images = {p for call in calls for p in call["prints"] if p != "zero"}  # distinct real views
    by_role: dict[str, dict] = {}
    for call in calls:
        role = by_role.setdefault(call["role"], {"calls": 0, "views": 0, "stand_ins": 0})
        role["calls"] += 1
        role["views"] += sum(p != "zero" for p in call["prints"])
        role["stand_ins"] += sum(p == "zero" for p in call["prints"])
    real = sum(r["views"] for r in by_role.values())
    result = {
        "prompts_per_iteration": prompts, "responses_per_prompt": n, "iterations": iterations,
        "distinct_views": len(images), "calls_per_iteration": len(calls) / iterations,
        # Each image is one iteration's (the corpus has more prompts than the run reads), so encodings of a
        # view over the run are its encodings in that iteration.
        "encodings_per_view_per_iteration": real / max(len(images), 1),
        "by_role": {role: {k: v / iterations for k, v in figures.items()} for role, figures in sorted(by_role.items())},
    }  # fmt: skip
    print(f"\n### ViT calls per RL iteration: {prompts} image prompts x {n} responses, PPO with the critic, "
          f"4 minibatches, 2 ranks; the mean of {iterations} iterations\n")  # fmt: skip
    print("| process: method | ViT calls | views encoded | zero stand-ins |\n|---|---|---|---|")
    for role, figures in result["by_role"].items():
        print(f"| {role} | {figures['calls']:.1f} | {figures['views']:.1f} | {figures['stand_ins']:.1f} |")
    print(f"| all | {result['calls_per_iteration']:.1f} | {real / iterations:.1f} | |")
    print(
        f"\nEach distinct view (an image's global view or crop; {len(images)} over the run) was encoded "
        f"{result['encodings_per_view_per_iteration']:.1f} times an iteration."
    )
    return result


PROFILE_RATE = 100  # samples a second a thread; py-spy's own cost grows with it (2 cores, ~6 processes)
PRETRAIN_ROOTS = [
    "Trainer.loop", "Trainer.train_step", "backward_global_batch", "Step3VLForConditionalGeneration.forward",
    "Step3VLForConditionalGeneration.decode", "DeepSpeedEngine.backward", "DeepSpeedEngine.step",
]  # fmt: skip
RL_ROOTS = [
    "Driver.iteration", "Driver.collect", "TrainWorker.score", "TrainWorker.update", "TrainWorker.sync_weights",
    "HFEngine.generate", "Step3VLForConditionalGeneration.forward", "Step3VLForConditionalGeneration.decode",
]  # fmt: skip


def profile(args, work: Path) -> dict:
    sys.path.insert(0, str(PEERS))
    import spy  # noqa: PLC0415 - only this measure needs it (and py-spy, from .venv-peers)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    steps, iterations = max(args.steps, 40), max(args.iterations, 30)
    out = work / "profile_pretrain"
    shutil.rmtree(out, ignore_errors=True)
    command = our_pretrain_command(work, out, steps, args.seq_len, args.batch)
    spy.record(
        args.peers_python, command, work / "profile_pretrain.txt", work / "profile_pretrain.log", env, PROFILE_RATE
    )
    init, _ = write_weights(work, TINY)
    out = work / "profile_rl"
    shutil.rmtree(out, ignore_errors=True)
    env["PYTHONPATH"] = os.pathsep.join([str(PEERS), os.environ.get("PYTHONPATH", "")])
    command = our_rl_command(work, out, iterations, 2, TINY, init)
    spy.record(args.peers_python, command, work / "profile_rl.txt", work / "profile_rl.log", env, PROFILE_RATE)
    return analyse_profiles(work, steps, iterations)


def analyse_profiles(work: Path, steps: int, iterations: int) -> dict:
    import spy  # noqa: PLC0415

    rate, results = PROFILE_RATE, {}
    samples = spy.stacks(work / "profile_pretrain.txt")
    print(f"\n### Profile: our pre-training step (py-spy, {rate} Hz, {steps} steps, 2 ranks, tiny, text only)")
    results["pretrain"] = spy.report("pre-training", samples, PRETRAIN_ROOTS, rate, steps, "step")
    samples = spy.stacks(work / "profile_rl.txt")
    print(f"\n### Profile: our RL iteration (py-spy, {rate} Hz, {iterations} iterations, 2 ranks, tiny)")
    results["rl"] = spy.report("RL", samples, RL_ROOTS, rate, iterations, "iteration")
    driver = spy.grouped_children(samples, "Driver.iteration")
    print("\nRay's share: the driver's wall time in a phase against the actor's own time in its method.\n")
    print("| driver phase | driver's wall s an iteration | actor method | its s an iteration (per actor) |")
    print("|---|---|---|---|")
    pairs = [("Driver.collect", "HFEngine.generate"), ("Driver.score_with_models", "TrainWorker.score"),
             ("get", "TrainWorker.update"), ("Driver.sync_weights", "TrainWorker.sync_weights")]  # fmt: skip
    for phase, method in pairs:
        total, _, _, pids = spy.breakdown(samples, method)
        actor = total / max(len(pids), 1) / rate / iterations
        print(f"| {phase} | {driver.get(phase, 0) / rate / iterations:.4f} | {method} | {actor:.4f} |")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    measures = ["all", "pretrain", "rl", "reward", "vit", "profile", "staleness"]
    parser.add_argument("measure", nargs="?", default="all", choices=measures)
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--peers-python", default=str(REPO / ".venv-peers" / "bin" / "python"))
    parser.add_argument("--steps", type=int, default=25, help="pre-training steps a side")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="rows a rank a pre-training step")
    parser.add_argument("--iterations", type=int, default=20, help="RL iterations a run (the large size: half)")
    parser.add_argument("--reward-iterations", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1, help="pretrain, rl: runs of each side, in turn; the best")
    parser.add_argument("--trl-threads", type=int, default=1, help="torch threads of TRL's one process")
    parser.add_argument("--tiny-only", action="store_true", help="rl: leave out the 4 x 512 decoder")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    if args.measure not in ("vit", "staleness") and not Path(args.peers_python).exists():
        sys.exit(f"{args.peers_python} is missing: bash benchmarks/peers/setup.sh builds it")
    work = args.work or Path(tempfile.mkdtemp(prefix="peers_cpu_"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "rl_prompts.jsonl").exists():
        write_inputs(work, args.seq_len)
    measures = ["pretrain", "rl", "reward", "vit"] if args.measure == "all" else [args.measure]
    results = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    for name in measures:
        before = os.getloadavg()[0]
        results[name] = globals()[name](args, work)
        load = {"before": before, "after": os.getloadavg()[0]}
        results[name] = {"load_average_1min": load, **results[name]}
        print(f"\n(load average, 1 minute: {load['before']:.2f} before, {load['after']:.2f} after; this machine has "
              f"{os.cpu_count()} cores: above that, other work shared them)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
