"""The whole recipe on the tiny model, on the CPU: synthetic corpora and their held-out splits ->
pre-training (2 ZeRO-3 ranks) -> export -> SFT stage 1 -> export -> SFT stage 2 -> export -> RLVR on Ray ->
export -> a reward model (Bradley-Terry) -> export -> RLHF with the reward-model service on loopback -> the
RLVR policy's message pools -> PaCoRe training -> export -> the last export scored on a held-out synthetic
benchmark, SeRe against PaCoRe -> loss and reward curves (PNGs), the figures by name (figures.json, which
the docs quote) and a summary (outputs/demo/summary.md) of what each stage did on held-out data.

    python launch/demo_pipeline.py [--out outputs/demo] [--steps N] [--rl-steps N] [--summary]

Each stage is the command a user runs (printed, and documented in docs/training.md, docs/rl.md, docs/rlhf.md,
docs/pacore.md and docs/evaluation.md), in a subprocess, from the current directory (outputs go under it); the
`+cpu=...` groups (configs/cpu/) hold the CPU settings, so the commands stay short. `--steps` and `--rl-steps`
override the groups' step counts (tests use them to run a few). Re-running resumes each stage from its last
checkpoint; `--summary` runs nothing and rewrites the curves, figures.json and the summary from the runs there
(their seconds from logs/seconds.json). Pre-training and SFT report a validation loss on held-out samples,
RLVR a held-out reward. SFT teaches the tiny model the answer format; RLVR then trains on the one synthetic
task it can learn in minutes (configs/cpu/rlvr.yaml), so the reward rises. The reward model learns the
synthetic preference (answers that name a colour), and RLHF raises the policy's score under it (docs/rlhf.md).
PaCoRe trains the RLVR policy on synthesis rounds whose messages are its own difficulty-filter rollouts
(docs/pacore.md); `launch/evaluate.py` then scores the result on held-out problems both ways
(docs/evaluation.md).
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from rl.plot import plot_run
from rl.rewards.answer import final_answer, split_reasoning

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
        f"chat.max_new_tokens=24 pacore.rounds=[8] out={out / 'eval'}",
    }


# The summary's table: (figure name, label, run, metric, whether the figure is the mean of the first and of
# the last `window` rows, as for RL, or the first and the last row's).
TABLE = [
    ("pretrain.loss", "pre-training (loss)", "pretrain", "loss", False),
    ("pretrain.eval_loss", "pre-training (validation loss)", "pretrain", "eval/loss", False),
    ("sft.loss", "SFT stage 1 (loss)", "sft", "loss", False),
    ("sft.eval_loss", "SFT stage 1 (validation loss)", "sft", "eval/loss", False),
    ("sft2.loss", "SFT stage 2 (loss)", "sft2", "loss", False),
    ("sft2.eval_loss", "SFT stage 2 (validation loss)", "sft2", "eval/loss", False),
    ("rlvr.reward", "RLVR (reward_mean)", "rlvr", "reward_mean", True),
    ("rlvr.heldout", "RLVR (held-out reward)", "rlvr", "eval/reward", False),
    ("rm.accuracy", "reward model (held-out accuracy)", "rm", "eval/accuracy", False),
    ("rlhf.rm_score", "RLHF (RM score)", "rlhf", "reward/rm", True),
    ("pacore.synthesis", "PaCoRe training (synthesis reward)", "pacore", "pacore/synthesis_reward", True),
    ("pacore.messages", "PaCoRe training (its messages' reward)", "pacore", "pacore/message_reward", True),
]
RUNS = ("pretrain", "sft", "sft2", "rlvr", "rm", "rlhf", "pacore")
MODES = {"sere": "SeRe", "pacore": "PaCoRe [8]"}
CHANCE = 0.25  # `choice`: a uniform guess among 4 options
OPTION = re.compile(r"^\(?([A-Za-z])(?:\)|\.|:|\s|$)")  # as rl/rewards/verifiable.py's choice_reward reads it


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def metric(rows: list[dict], key: str) -> list:
    """`key` in each row that has it (RL's step-0 row holds the validation alone)."""
    return [row[key] for row in rows if key in row]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def parameters(export: Path) -> int:
    """The parameters an export holds (its safetensors' headers, no weights read)."""
    from safetensors import safe_open

    count = 0
    for path in export.glob("*.safetensors"):
        with safe_open(path, "pt") as tensors:
            count += sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())  # noqa: SIM118
    return count


def answered_share(rows: list[dict], first: bool, window: int) -> tuple[float, float]:
    """RLVR's first or last `window` iterations: the share of responses scored (ended in the format with an
    option letter, right or wrong), and the share of those that named the right colour."""
    rows = [row for row in rows if "reward_mean" in row]
    rows = rows[:window] if first else rows[-window:]
    counts = [sum(v for k, v in row.items() if k.startswith("reward_status/")) for row in rows]  # responses
    scored = sum(row.get("reward_status/ok", 0) for row in rows)
    right = sum(row["reward_mean"] * count for row, count in zip(rows, counts, strict=True))
    return scored / sum(counts), right / scored if scored else 0.0


def letters(results: Path, mode: str) -> tuple[Counter, Counter]:
    """The benchmark's scored answers in `mode` by option letter, and its problems by their right letter."""
    answered, right = Counter(), Counter()
    for line in results.read_text().splitlines():
        row = json.loads(line)
        if row["mode"] != mode:
            continue
        right[row["answer"]] += 1
        for response in (r for r in row["responses"] if r["status"] == "ok"):
            final = final_answer(split_reasoning(response["text"])[1])
            if match := OPTION.match(final):
                answered[match.group(1).upper()] += 1
    return answered, right


def top_letter(root: Path) -> str:
    """The option letter the final export's PaCoRe syntheses answer most."""
    answered = letters(root / "eval" / "synthetic" / "results.jsonl", "pacore")[0]
    return answered.most_common(1)[0][0] if answered else "A"


def figures(root: Path) -> dict[str, float]:
    """The figures of the summary by name (`rlvr.reward.last`, `eval.pacore.low`, ...), from the runs'
    metrics.jsonl and the benchmark's files; docs quote them by these names (tests/e2e/docs.py)."""
    runs = {run: metrics(root / run / "metrics.jsonl") for run in RUNS}
    window = min(3, len(metric(runs["rlvr"], "reward_mean")))
    found: dict[str, float] = {"window": window, "model.parameters": parameters(root / "pacore_hf")}
    for name, _, run, key, rl in TABLE:
        have, span = metric(runs[run], key), window if rl else 1
        found[f"{name}.first"], found[f"{name}.last"] = mean(have[:span]), mean(have[-span:])
        found[f"{run}.steps"] = runs[run][-1]["step"]
    pretrain = runs["pretrain"]
    if switch := next((i for i, row in enumerate(pretrain) if row.get("phase")), None):
        found["pretrain.phase2.step"] = pretrain[switch]["step"]
        found["pretrain.phase2.tokens"] = pretrain[switch - 1]["tokens"]  # trained when it took over
    validation = next(row for row in pretrain if "eval/loss" in row)
    found |= {"pretrain.validation.step": validation["step"], "pretrain.validation.loss": validation["eval/loss"],
              "pretrain.validation.tokens": validation["eval/tokens"]}  # fmt: skip
    found |= {f"pretrain.validation.{k.removeprefix('eval/loss/')}": v for k, v in validation.items()
              if k.startswith("eval/loss/") and v is not None}  # fmt: skip
    rm_validations = [row for row in runs["rm"] if "eval/accuracy" in row]
    found["rm.validation.first_step"], found["rm.pairs"] = rm_validations[0]["step"], rm_validations[-1]["eval/pairs"]
    for end in ("first", "last"):
        found[f"rlvr.answered.{end}"], found[f"rlvr.right.{end}"] = answered_share(runs["rlvr"], end == "first", window)
    held_out = [row for row in runs["rlvr"] if "eval/reward" in row][-1]
    found["rlvr.heldout.untruncated"] = 1 - held_out["eval/truncated_fraction"]
    found["rlvr.heldout.guess"] = CHANCE * found["rlvr.heldout.untruncated"]  # the most a uniform guess scores
    found["rlvr.heldout.responses"] = held_out["eval/responses"]
    found["rlvr.heldout.se"] = math.sqrt(
        held_out["eval/reward"] * (1 - held_out["eval/reward"]) / held_out["eval/responses"]
    )
    benchmark = json.loads((root / "eval" / "synthetic" / "summary.json").read_text())["modes"]
    letter = top_letter(root)
    for mode, result in benchmark.items():
        found |= {f"eval.{mode}": result["accuracy"], "eval.problems": result["problems"],
                  "eval.samples": result["samples"] / result["problems"]}  # fmt: skip
        if result["ci95"]:
            found[f"eval.{mode}.low"], found[f"eval.{mode}.high"] = result["ci95"]
        answered, right = letters(root / "eval" / "synthetic" / "results.jsonl", mode)
        found[f"eval.{mode}.top_letter"] = answered[letter] / max(1, sum(answered.values()))  # of its scored answers
        found["eval.top_letter_right"] = right[letter]  # the problems whose right answer it is
    return found


def summary(root: Path, found: dict[str, float], seconds: dict[str, float]) -> list[str]:
    """outputs/demo/summary.md: the table of each stage's figures, what they mean, and what they say."""
    shown: set[str] = set()

    def took(stage: str) -> str:
        """The stage's seconds, on its first row only (none when the summary is rewritten alone)."""
        first, _ = stage not in shown, shown.add(stage)
        return f"{seconds[stage]:.0f}" if first and stage in seconds else ""

    table = [f"| {label} | {found[f'{run}.steps']} | {found[f'{name}.first']:.3f} | {found[f'{name}.last']:.3f} | "
             f"{took(run)} | {key} |" for name, label, run, key, _ in TABLE]  # fmt: skip
    for mode, name in MODES.items():
        interval = (
            f" [{found[f'eval.{mode}.low']:.3f}, {found[f'eval.{mode}.high']:.3f}]"
            if f"eval.{mode}.low" in found
            else ""
        )
        table.append(f"| final export, {name} (held-out benchmark) | {found['eval.problems']} problems, "
                     f"{found['eval.problems'] * found['eval.samples']:.0f} answers | | {found[f'eval.{mode}']:.3f}"
                     f"{interval} | {took('evaluate')} | accuracy |")  # fmt: skip
    window, f = found["window"], found
    rm_steps = [str(r["step"]) for r in metrics(root / "rm" / "metrics.jsonl") if "eval/accuracy" in r]
    phase2 = (
        f" Pre-training's phase 2 took over at step {f['pretrain.phase2.step']}." if "pretrain.phase2.step" in f else ""
    )
    pacore, sere = (
        (f[f"eval.{mode}"], f.get(f"eval.{mode}.low", 0), f.get(f"eval.{mode}.high", 1)) for mode in ("pacore", "sere")
    )
    versus = "at least matching" if pacore[0] >= sere[0] else "below"
    overlap = "overlapping" if pacore[1] <= sere[2] and sere[1] <= pacore[2] else "apart"
    z = (f["rlvr.heldout.last"] - f["rlvr.heldout.guess"]) / f["rlvr.heldout.se"]
    colour = "the colour too" if z >= 2 else "the colour not yet clearly above a guess"
    trained = ", ".join(f"`{run}/loss_curve.png`" for run in ("pretrain", "sft", "sft2"))
    losses = f"{trained}, `rm/loss_curve.png`"
    rewards = ", ".join(f"`{run}/reward_curve.png`" for run in ("rlvr", "rlhf", "pacore"))
    exports = sum(v for k, v in seconds.items() if k.startswith("export"))
    return [
        "# The tiny pipeline on the CPU", "",
        "| stage | steps | first | last | seconds | figure |", "|---|---|---|---|---|---|", *table, "",
        "Pre-training, SFT and the reward model: the first and the last step's figure, and the first and the "
        "last validation (pre-training's every 10 steps, SFT's every 20; the reward model's at steps "
        f"{', '.join(rm_steps)}). RLVR, RLHF and PaCoRe training: the mean of the first {window} and of "
        f"the last {window} iterations; RLVR's held-out reward before training and at its last validation.{phase2}",
        "",
        *(f"- `{key}`: {meaning}." for key, meaning in MEANINGS.items()), "",
        "What the held-out figures say:", "",
        f"- Pre-training and SFT: each stage's validation loss falls with its training loss, on samples it never "
        f"trained on ({f['pretrain.eval_loss.first']:.2f} to {f['pretrain.eval_loss.last']:.2f}, "
        f"{f['sft.eval_loss.first']:.2f} to {f['sft.eval_loss.last']:.2f}, {f['sft2.eval_loss.first']:.2f} to "
        f"{f['sft2.eval_loss.last']:.2f}): {trained}.",
        f"- RLVR against chance: a response that does not end in the format scores 0, a uniform guess among the "
        f"4 colours 0.25 of the rest. Its rise from {f['rlvr.reward.first']:.3f} to {f['rlvr.reward.last']:.3f} "
        f"is both: the share of responses ending in the format with a letter went from "
        f"{f['rlvr.answered.first']:.0%} to {f['rlvr.answered.last']:.0%} (the first and the last {window} "
        f"iterations), and of those the share naming the right colour from {f['rlvr.right.first']:.0%} to "
        f"{f['rlvr.right.last']:.0%} (chance: 25%). Held out, {f['rlvr.heldout.untruncated']:.0%} of the last "
        f"validation's responses ended within the length limit, so a uniform guess would score at most "
        f"{f['rlvr.heldout.guess']:.3f}; it scored {f['rlvr.heldout.last']:.3f}, {z:.1f} standard errors "
        f"({f['rlvr.heldout.se']:.3f}, {f['rlvr.heldout.responses']} responses) above that: on new prompts the "
        f"format carries over, {colour}.",
        f"- PaCoRe {pacore[0]:.3f} against SeRe {sere[0]:.3f} on the held-out benchmark ({versus} it, the "
        f"intervals {overlap}): the tiny policy barely reads its messages. `{top_letter(root)}` is "
        f"{f['eval.pacore.top_letter']:.0%} of its syntheses' answers (of SeRe's: {f['eval.sere.top_letter']:.0%}), "
        f"right for {f['eval.top_letter_right']} of the {f['eval.problems']} problems. PaCoRe's gain needs a "
        "policy that weighs its references and synthesises an answer: the paper's is a reasoning model after "
        "RLVR, trained 500 iterations on 16 to 24 messages of about 1K tokens (docs/pacore.md, Training); this "
        f"one has {f['model.parameters'] / 1e6:.1f}M parameters, 24-token replies and {f['pacore.steps']} iterations.",
        "",
        f"Loss curves (training and validation): {losses}. Reward curves: {rewards}. Exports: `pretrain_hf/`, "
        "`sft_hf/`, `sft2_hf/`, `rlvr_hf/`, `rm_hf/`, `pacore_hf/`. Logs: `logs/`. Benchmark responses: "
        "`eval/synthetic/results.jsonl`. Figures by name: `figures.json`."
        + (f" Exports take {exports:.0f} s in all." if exports else ""),
        "RL log-prob mismatch, engine vs trainer (max over the run): "
        f"{max(metric(metrics(root / 'rlvr' / 'metrics.jsonl'), 'logprob_mismatch/max_abs')):.2e}.",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo", help="relative to the current directory, or absolute")
    parser.add_argument("--steps", type=int, help="pre-training and SFT steps (default: configs/cpu/)")
    parser.add_argument("--rl-steps", type=int, help="RLVR iterations (default: configs/cpu/rlvr.yaml)")
    parser.add_argument("--summary", action="store_true", help="run nothing: the plots and summary of the runs there")
    args = parser.parse_args()
    root = Path(args.out)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    timings = logs / "seconds.json"
    if not args.summary:
        stages = commands(Path(args.out), args.steps, args.rl_steps)
        timings.write_text(json.dumps({stage: run(stage, command, logs) for stage, command in stages.items()}))
    seconds = json.loads(timings.read_text()) if timings.exists() else {}
    for name in RUNS:
        plot_run(root / name)
    found = figures(root)
    (root / "figures.json").write_text(json.dumps(found, indent=1) + "\n")
    lines = summary(root, found, seconds)
    (root / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
