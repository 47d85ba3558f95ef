"""The whole recipe on the tiny model, on the CPU: synthetic corpora and their held-out splits ->
pre-training (2 ZeRO-3 ranks) -> export -> SFT stage 1 -> export -> SFT stage 2 -> export -> RLVR on Ray ->
export -> a reward model (Bradley-Terry) -> export -> RLHF with the reward-model service on loopback -> the
RLVR policy's message pools -> PaCoRe training -> export -> the last export scored on a held-out synthetic
benchmark, SeRe against PaCoRe -> reward-curve PNGs and a summary (outputs/demo/summary.md).

    python launch/demo_pipeline.py [--out outputs/demo] [--steps N] [--rl-steps N]

Each stage is the command a user runs (printed, and documented in docs/training.md, docs/rl.md,
docs/rlhf.md, docs/pacore.md and docs/evaluation.md), in a subprocess, from the current directory (outputs
go under it); the `+cpu=...` groups (configs/cpu/) hold the CPU settings, so the commands stay short.
`--steps` and `--rl-steps` override the groups' step counts (tests use them to run a few). Re-running
resumes each stage from its last checkpoint. Pre-training and SFT report a validation loss on held-out
samples, RLVR a held-out reward. SFT teaches the tiny model the answer format; RLVR then trains on the one
synthetic task it can learn in minutes (configs/cpu/rlvr.yaml), so the reward rises. The reward model
learns the synthetic preference (answers that name a colour), and RLHF raises the policy's score under it
(docs/rlhf.md). PaCoRe trains the RLVR policy on synthesis rounds whose messages are its own
difficulty-filter rollouts (docs/pacore.md); `launch/evaluate.py` then scores the result on held-out
problems both ways (docs/evaluation.md).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rl.plot import plot_rewards

REPO = Path(__file__).resolve().parents[1]
# How the documented commands' first words run here: this interpreter, so the venv's packages.
EXECUTABLES = {"python": [sys.executable], "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
# What the summary's figures mean (its table's last column).
MEANINGS = {
    "loss": "mean cross-entropy per trained token, in nats (a uniform guess over the 1,024-token vocabulary: 6.93)",
    "eval/loss": "the same on held-out samples of the stage's own tasks (drawn with another seed): the same "
    "samples at every validation",
    "reward_mean": "the share of responses the verifier scored correct, 0-1 (`choice`: the option letter; "
    "a uniform guess among 4 options scores 0.25, a response cut at the length limit or without "
    "`</think>` scores 0)",
    "eval/reward": "RLVR's reward on held-out `choice` prompts, 4 samples each at temperature 1",
    "accuracy": "`launch/evaluate.py` on the last export: the share of held-out `choice` problems answered "
    "right, averaged over its 4 samples, with a 95% interval over problems; a SeRe sample is one answer, a "
    "PaCoRe sample the synthesis of 8 rollouts' conclusions",
    "eval/accuracy": "the reward model's share of held-out preference pairs it ranks right, 0-1 (chance: 0.5)",
    "pacore/synthesis_reward": "the verifier's score of the synthesis given the messages, 0-1; "
    "`pacore/message_reward`: the mean score of those messages when the RLVR policy wrote them",
    "reward/rm": "the reward model's score of the policy's answers, 0-1: sigmoid((raw - mean) / std) with the "
    "mean and std of its held-out scores, so 0.5 is an average answer of its data",
}


def run(stage: str, command: str, log_dir: Path) -> float:
    started = time.monotonic()
    print(f"== {stage}: {command}", flush=True)
    program, *arguments = command.split()
    arguments = [str(REPO / a) if a.endswith(".py") else a for a in arguments]  # the scripts, from anywhere
    with (log_dir / f"{stage}.log").open("w") as log:
        done = subprocess.run([*EXECUTABLES[program], *arguments], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"{stage} failed (exit {done.returncode}): see {log_dir / f'{stage}.log'}")
    return time.monotonic() - started


def steps(count: int | None) -> str:
    return f" trainer.max_steps={count} trainer.save_every={count}" if count else ""


def commands(out: Path, train_steps: int | None, rl_steps: int | None) -> dict[str, str]:
    """The stages' commands, in order; paths relative to the current directory unless `out` is absolute."""
    corpus = out / "synthetic"
    synthetic = "python data/make_synthetic.py --shard-size 10"

    def train(script: str, recipe: str, corpus_kind: str, stage: str, init_from: str | None = None) -> str:
        """A torchrun command of pre-training's trainer (pre-training, SFT, the reward model)."""
        cpu = {"train_rm.py": "rm"}.get(script, script.removesuffix(".py"))
        command = f"torchrun --nproc_per_node 2 launch/{script} +recipe={recipe} +cpu={cpu}"
        command += f" data.root={corpus / corpus_kind}"
        command += f" trainer.init_from={out / init_from}" if init_from else ""
        return command + f" trainer.output_dir={out / stage}" + steps(train_steps)

    def heldout(kind: str, num: int, seed: int) -> str:
        """Validation data: the corpus's own tasks, drawn with another seed, under its root's `heldout/`."""
        return f"{synthetic} --kind {kind} --out {corpus / kind / 'heldout'} --num {num} --seed {seed}"

    def export(stage: str) -> str:
        return f"python launch/export_hf.py checkpoint={out / stage} out={out / f'{stage}_hf'}"

    return {
        "synthetic_pretrain": f"{synthetic} --kind pretrain --out {corpus / 'pretrain'} --num 400",
        "synthetic_pretrain_heldout": heldout("pretrain", 40, 1),
        "synthetic_sft": f"{synthetic} --kind sft --out {corpus / 'sft'} --num 420",
        "synthetic_sft_heldout": heldout("sft", 42, 1),
        "synthetic_rl": f"{synthetic} --kind rl --out {corpus / 'rl'} --num 240",
        "synthetic_rl_heldout": heldout("rl", 120, 3),
        "pretrain": train("pretrain.py", "pretrain", "pretrain", "pretrain"),
        "export_pretrain": export("pretrain"),
        "sft": train("sft.py", "sft_stage1", "sft", "sft", "pretrain_hf"),
        "export_sft": export("sft"),
        "sft2": train("sft.py", "sft_stage2", "sft", "sft2", "sft_hf"),
        "export_sft2": export("sft2"),
        "rlvr": f"python rl/run.py stage=rlvr +cpu=rlvr policy.init_from={out / 'sft2_hf'} "
        f"prompts.root={corpus / 'rl'} trainer.output_dir={out / 'rlvr'}" + steps(rl_steps),
        "export_rlvr": export("rlvr"),
        "synthetic_preference": f"{synthetic} --kind preference --out {corpus / 'preference'} --num 400",
        "synthetic_preference_heldout": heldout("preference", 100, 1),
        "synthetic_rlhf": f"{synthetic} --kind rlhf --out {corpus / 'rlhf'} --num 240 --seed 2",
        "rm": train("train_rm.py", "rm", "preference", "rm", "sft2_hf"),
        "export_rm": export("rm"),
        "rlhf": f"python rl/run.py stage=rlhf +recipe=rlhf +cpu=rlhf policy.init_from={out / 'rlvr_hf'} "
        f"prompts.root={corpus / 'rlhf'} reward.service.server.rm.scalar.model={out / 'rm_hf'} "
        f"trainer.output_dir={out / 'rlhf'}" + steps(rl_steps),
        "pools": f"python data/filter_difficulty.py --k 8 --save-messages --out {out / 'pools'} -- stage=rlvr "
        f"+cpu=rlvr policy.init_from={out / 'rlvr_hf'} prompts.root={corpus / 'rl'}",
        "pacore": f"python rl/run.py stage=pacore +recipe=pacore +cpu=pacore policy.init_from={out / 'rlvr_hf'} "
        f"prompts.root={out / 'pools'} trainer.output_dir={out / 'pacore'}" + steps(rl_steps),
        "export_pacore": export("pacore"),
        "evaluate": f"python launch/evaluate.py model={out / 'pacore_hf'} bench=synthetic "
        f"data={corpus / 'rl' / 'heldout' / 'choice'}/*.tar modes=[sere,pacore] chat.tokenizer=tiny "
        f"chat.processor=configs/processor/tiny.yaml chat.max_new_tokens=24 pacore.rounds=[8] out={out / 'eval'}",
    }


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def metric(rows: list[dict], key: str) -> list:
    """`key` in each row that has it (RL's step-0 row holds the validation alone)."""
    return [row[key] for row in rows if key in row]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def figure(value: float | None) -> str:
    return "none scored" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo", help="relative to the current directory, or absolute")
    parser.add_argument("--steps", type=int, help="pre-training and SFT steps (default: configs/cpu/)")
    parser.add_argument("--rl-steps", type=int, help="RLVR iterations (default: configs/cpu/rlvr.yaml)")
    args = parser.parse_args()
    root = Path(args.out)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    seconds = {stage: run(stage, command, logs) for stage, command in commands(Path(args.out), args.steps,
                                                                              args.rl_steps).items()}  # fmt: skip
    pngs = [plot_rewards(root / stage).relative_to(root) for stage in ("rlvr", "rlhf", "pacore")]
    pretrain, sft, sft2, rlvr, rm, rlhf, pacore = (
        metrics(root / stage / "metrics.jsonl") for stage in ("pretrain", "sft", "sft2", "rlvr", "rm", "rlhf", "pacore")
    )
    benchmark = json.loads((root / "eval" / "synthetic" / "summary.json").read_text())["modes"]

    def row(name: str, rows: list[dict], key: str, stage: str | None = None, window: int = 1) -> str:
        """The stage's steps, and the mean of `key` over its first and last `window` rows that have it."""
        have = metric(rows, key)
        first, last = mean(have[:window]), mean(have[-window:])
        took = f"{seconds[stage]:.0f}" if stage else ""
        return f"| {name} | {rows[-1]['step']} | {first:.3f} | {last:.3f} | {took} | {key} |"

    def evaluated(mode: str, name: str, stage: str | None = None) -> str:
        """The final export's accuracy on the synthetic benchmark in one mode, with its 95% interval."""
        result = benchmark[mode]
        interval = " [{:.3f}, {:.3f}]".format(*result["ci95"]) if result["ci95"] else ""
        took = f"{seconds[stage]:.0f}" if stage else ""
        return (f"| {name} | {result['problems']} problems, {result['samples']} answers | | "
                f"{figure(result['accuracy'])}{interval} | {took} | accuracy |")  # fmt: skip

    window = min(3, len(metric(rlvr, "reward_mean")))
    rm_evaluations = [str(r["step"]) for r in rm if "eval/accuracy" in r]
    switch = next((r for r in pretrain if r.get("phase")), None)
    phase2 = f" Pre-training's phase 2 took over at step {switch['step']}." if switch else ""
    lines = [
        "# The tiny pipeline on the CPU", "",
        "| stage | steps | first | last | seconds | figure |", "|---|---|---|---|---|---|",
        row("pre-training (loss)", pretrain, "loss", "pretrain"),
        row("pre-training (validation loss)", pretrain, "eval/loss"),
        row("SFT stage 1 (loss)", sft, "loss", "sft"), row("SFT stage 1 (validation loss)", sft, "eval/loss"),
        row("SFT stage 2 (loss)", sft2, "loss", "sft2"), row("SFT stage 2 (validation loss)", sft2, "eval/loss"),
        row("RLVR (reward_mean)", rlvr, "reward_mean", "rlvr", window),
        row("RLVR (held-out reward)", rlvr, "eval/reward"),
        row("reward model (held-out accuracy)", rm, "eval/accuracy", "rm"),
        row("RLHF (RM score)", rlhf, "reward/rm", "rlhf", window),
        row("PaCoRe training (synthesis reward)", pacore, "pacore/synthesis_reward", "pacore", window),
        row("PaCoRe training (its messages' reward)", pacore, "pacore/message_reward", "pacore", window),
        evaluated("sere", "final export, SeRe (held-out benchmark)", "evaluate"),
        evaluated("pacore", "final export, PaCoRe [8] (held-out benchmark)"), "",
        "Pre-training, SFT and the reward model: the first and the last step's figure, and the first and the "
        "last validation (pre-training's every 10 steps, SFT's every 20; the reward model's at steps "
        f"{', '.join(rm_evaluations)}). RLVR, RLHF and PaCoRe training: the mean of the first {window} and of "
        f"the last {window} iterations; RLVR's held-out reward before training and at its last validation."
        f"{phase2}", "",
        *(f"- `{key}`: {meaning}." for key, meaning in MEANINGS.items()), "",
        f"Reward curves: `{pngs[0]}`, `{pngs[1]}`, `{pngs[2]}`. Exports: `pretrain_hf/`, `sft_hf/`, `sft2_hf/`, "
        "`rlvr_hf/`, `rm_hf/`, `pacore_hf/`. Logs: `logs/`. Benchmark responses: `eval/synthetic/results.jsonl`. "
        f"Exports take {sum(v for k, v in seconds.items() if k.startswith('export')):.0f} s in all.",
        f"RL log-prob mismatch, engine vs trainer (max over the run): "
        f"{max(metric(rlvr, 'logprob_mismatch/max_abs')):.2e}.",
    ]  # fmt: skip
    (root / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
