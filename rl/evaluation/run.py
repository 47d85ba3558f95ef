"""The evaluation loop: problems read once, in batches; each batch answered in every mode not yet scored
for it (results.jsonl of an earlier run of the same command); the lines appended as each batch is done;
the summary over every problem read, whichever run scored it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rl.chat_models import ChatModel
from rl.evaluation.accuracy import ModeSummary, ProblemScores
from rl.evaluation.config import EvaluateConfig
from rl.evaluation.modes import PaCoRe, SeRe
from rl.evaluation.prompts import problem_reader
from rl.evaluation.results import read_scored
from rl.pacore.inference import Problem, problem_sources
from rl.rewards import RewardScorer
from step3vl_train.data.mixed import MixedSamples
from step3vl_train.usage import UsageError

RESULTS, SUMMARY, SETTINGS = "results.jsonl", "summary.json", "settings.json"


def settings(config: EvaluateConfig, mode: str) -> dict[str, Any]:
    """What decides a response of `mode` and its score: a rerun into the same folder must not change it,
    or its summary would mix two evaluations."""
    chat, reward = config.chat, config.reward
    bench = {key: value for key, value in asdict(config.bench).items() if key not in ("name", "data")}
    return {
        "backend": chat.backend,
        "model": chat.endpoint.model if chat.backend == "openai" else chat.model,
        "model_config": chat.model_config,
        "tokenizer": chat.tokenizer,
        "processor": chat.processor,
        "temperature": chat.temperature,
        "top_p": chat.top_p,
        "max_new_tokens": config.reply_length(mode),
        "bench": bench,
        "reward": {key: getattr(reward, key) for key in ("fn", "options", "require_reasoning", "truncated_score")},
        **({"pacore": asdict(config.pacore)} if mode == "pacore" else {}),
    }


def check_settings(folder: Path, config: EvaluateConfig) -> None:
    """Refuses to resume a mode whose settings changed; records those of a mode run for the first time."""
    path = folder / SETTINGS
    recorded = json.loads(path.read_text()) if path.exists() else {}
    for mode in config.modes:
        current, earlier = settings(config, mode), recorded.setdefault(mode, settings(config, mode))
        changed = sorted(key for key in current.keys() | earlier.keys() if current.get(key) != earlier.get(key))
        if changed:
            raise UsageError(
                f"{folder} holds {mode} results of an evaluation with other settings ({', '.join(changed)} differ: "
                f"see {path}); a rerun resumes only the same evaluation: give another out= or remove the folder"
            )
    path.write_text(json.dumps(recorded, indent=1) + "\n")


def answerers(config: EvaluateConfig, model: ChatModel, tokenizer, scorer: RewardScorer) -> dict[str, SeRe | PaCoRe]:
    """Each mode on the one loaded model, at the mode's own reply length."""
    modes: dict[str, SeRe | PaCoRe] = {}
    for name in config.modes:
        limited = model.limited(config.reply_length(name))
        if name == "sere":
            modes[name] = SeRe(limited, scorer, config.bench.samples, config.seed)
        else:
            modes[name] = PaCoRe(config.pacore, limited, tokenizer, scorer, config.bench.samples)
    return modes


def batches(config: EvaluateConfig, samples: MixedSamples) -> Iterator[list[Problem]]:
    """The benchmark's problems, `batch_problems` at a time, each read once, up to `max_problems`."""
    read, taken = problem_reader(config.bench, config.reward.fn), 0
    while True:
        size = config.batch_problems
        if config.max_problems is not None:
            size = min(size, config.max_problems - taken)
        problems = samples.take(size, read, "problem") if size > 0 else []
        if not problems:
            return
        taken += len(problems)
        yield problems


def evaluate(config: EvaluateConfig, model: ChatModel, tokenizer) -> dict[str, Any]:
    """Every problem in each of `config.modes`; writes OUT/<bench>/results.jsonl, summary.json and
    settings.json; returns the summary. `tokenizer`: the model's, for PaCoRe's messages."""
    start = time.monotonic()
    folder = Path(config.out) / config.bench.name
    folder.mkdir(parents=True, exist_ok=True)
    check_settings(folder, config)
    scored = read_scored(folder / RESULTS)
    samples = MixedSamples(problem_sources(config.bench.data), None, seed=config.seed, max_epochs=1)
    scorer = RewardScorer(config.reward)
    modes = answerers(config, model, tokenizer, scorer)
    summaries = {name: ModeSummary() for name in modes}
    progress = tqdm(total=config.max_problems, desc=config.bench.name, unit="problem")
    try:
        with (folder / RESULTS).open("a") as results:
            for batch, problems in enumerate(batches(config, samples)):
                for name, mode in modes.items():
                    todo = [problem for problem in problems if (problem.sample.key, name) not in scored]
                    for line in mode.run(todo, batch) if todo else []:
                        results.write(json.dumps(line) + "\n")
                        scored[line["key"], name] = ProblemScores.of(line)
                    results.flush()
                    summaries[name].run_now += len(todo)
                    summaries[name].problems += [scored[problem.sample.key, name] for problem in problems]
                progress.update(len(problems))
    finally:
        progress.close()
        scorer.close()
    summary = {
        "benchmark": config.bench.name,
        "modes": {name: summaries[name].row(mode.calls) for name, mode in modes.items()},
        "data_skips": dict(samples.skips),
        "seconds": round(time.monotonic() - start, 3),
    }
    (folder / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def table(summary: dict[str, Any]) -> str:
    """The modes side by side, as the launch script prints them."""
    rows = [f"{summary['benchmark']:<12} {'accuracy':>8}  {'95% CI':<15} {'problems':>8} {'samples':>8} {'scored':>8}"]
    for name, row in summary["modes"].items():
        accuracy = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.2f}"
        ci = "-" if row["ci95"] is None else f"[{100 * row['ci95'][0]:.2f}, {100 * row['ci95'][1]:.2f}]"
        rows.append(f"{name:<12} {accuracy:>8}  {ci:<15} {row['problems']:>8} {row['samples']:>8} {row['scored']:>8}")
    return "\n".join(rows)
