"""The GPU check: the real entry points on one GPU, at the released widths and reduced depth, in bf16.

bash benchmarks/gpu/run.sh                       # on the device: wheels, then this, into $OUT
python benchmarks/gpu/check.py --out DIR         # the same, wherever the wheels are installed
python benchmarks/gpu/check.py --out DIR --smoke # the CPU: the tiny model and short rows (a test runs it)

Stages, one after another, each in its own process under its time budget (`--budget NAME=SECONDS`):
1. `pretrain_4k`: launch/pretrain.py +recipe=pretrain on synthetic pre-training shards, 4,096-token packs.
2. `pretrain_4k_ga8`: the same at trainer.grad_accum=8: the loader's overlap and prefetch across a step's
   micro-batches, and the share of the step spent waiting for it (`time/data_wait`).
3. `sft_32k`: launch/sft.py +recipe=sft_stage1 on synthetic SFT shards, 32,768-token packs: the chunked
   loss, the vision tower in chunks, flash or flex attention.
4. `rl`: RLVR iterations with the transformers engine (benchmarks/gpu/rl_iteration.py), the last timed.
A training stage runs `--warmup` steps (compilation, allocator growth) and then `--timed-steps`; its
figures are medians over the timed steps alone, beside launch/estimate_memory.py's prediction.
The model: the released widths (PE-lang 1536 x 47 heads 16, Qwen3-8B's 4096 x 12288, 151,936 tokens)
with `--vit-layers` blocks and `--layers` decoder layers, so that one GPU holds its optimizer state.

DIR/results.json and DIR/summary.md (the table BENCHMARKS.md takes) are rewritten after every stage, and
DIR/<stage>.log keeps each stage's output. A stage over its budget is stopped and recorded as
`timed_out`, with its seconds and the tail of its log, and the next stage runs. On SIGTERM (run.sh's
backstop) or SIGINT the running stage is stopped, the rest are recorded as skipped, and the results are written.
The stages run with TORCH_LOGS=recompiles, and torch's warning that flex attention runs without
torch.compile (its unfused fallback) raised as an error; the warning found in a log fails the stage too.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from launch.estimate_memory import estimate  # noqa: E402
from step3vl_train.data.synthetic import write_corpus  # noqa: E402
from step3vl_train.train.memory import ClusterConfig  # noqa: E402
from step3vl_train.train.recipes import register_recipes  # noqa: E402

TRAINING_STAGES = ("pretrain_4k", "pretrain_4k_ga8", "sft_32k")
STAGES = (*TRAINING_STAGES, "rl")
# Guesses for one H100 (no GPU has run the check yet): each stage's start (imports, the model under
# ZeRO-3, the loader's first packs), flex attention's first compile (pretrain_4k_ga8 finds pretrain_4k's
# kernels in the inductor cache), then warm-up and timed steps. 400 s in all; with run.sh's setup
# (about 30 s: wheels, imports) and this script's (about 15 s: imports, corpora) the check takes about
# 445 s, inside run.sh's 465 s backstop and under 8 minutes.
GPU_BUDGETS_S = {"pretrain_4k": 100, "pretrain_4k_ga8": 75, "sft_32k": 125, "rl": 100}
# The CPU's stages take about 15 s each with the 2 cores free; the cores are shared, so room to spare.
SMOKE_BUDGET_S = 150
MIN_TIMED_STEPS = 3
RL_ITERATIONS = 2  # the first warms up, the second is timed
# torch's warning when flex_attention runs eagerly, the unfused path that materialises the whole score
# matrix (torch 2.9 to 2.13; earlier ones end the sentence "- this will be slow"). With transformers it
# means the compiled kernel was given up (dynamo's recompile limit, a compile error suppressed).
FLEX_FALLBACK = "flex_attention called without torch.compile"
RECOMPILE = "Recompiling function"  # a line of TORCH_LOGS=recompiles
POLL_S = 0.2
KILL_GRACE_S = 5
TRAINING_FIGURES = ("tokens_per_s", "tflops_per_s", "mfu", "mfu/causal", "mfu/vit", "mfu/decoder", "memory/peak_gib")
RL_FIGURES = ("reward_mean", "response_len_mean", "logprob_mismatch/max_abs", "memory/peak_gib")
STOP_REQUESTED = threading.Event()


class StageIncomplete(Exception):
    """A stage's output lacks what its figures need."""


@dataclass
class Outcome:
    """How a stage's process ended: `status` "ok", "failed", "timed_out" or "stopped" (the check got
    SIGTERM), after `seconds`, with its whole output."""

    status: str
    seconds: float
    returncode: int | None
    log: str


@dataclass
class Stage:
    """A command under a time budget, and how to read its figures from what it wrote."""

    name: str
    kind: str  # "training" or "rl": the summary's row
    command: list[str]
    budget_s: float
    figures: Callable[[], dict]  # raises StageIncomplete
    output: Path | None = None  # a folder or file cleared before the run


# ---- running a stage -----------------------------------------------------------------------------------


def stage_environment() -> dict:
    """The stages' environment: the repo importable, dynamo's recompilations logged, and torch's warning
    that flex attention runs without torch.compile raised as an error, so that the stage stops at once
    instead of spending its budget on the unfused path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = joined(os.pathsep, env.get("PYTHONPATH"), str(REPO))
    env.setdefault("OMP_NUM_THREADS", "4")
    env["TORCH_LOGS"] = joined(",", env.get("TORCH_LOGS"), "recompiles")
    # Python reads PYTHONWARNINGS left to right and the last entry wins.
    env["PYTHONWARNINGS"] = joined(",", env.get("PYTHONWARNINGS"), f"error:{FLEX_FALLBACK}:UserWarning")
    return env


def joined(separator: str, *parts: str | None) -> str:
    """The non-empty parts joined."""
    return separator.join(part for part in parts if part)


def run_logged(command: list[str], log_path: Path, budget_s: float) -> Outcome:
    """Runs `command` in its own process group with its output in `log_path`, for at most `budget_s`
    seconds or until SIGTERM; returns how it ended."""
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=stage_environment(), start_new_session=True
        )
        status = wait_within(process, budget_s)
    seconds = time.perf_counter() - started
    return Outcome(status, seconds, process.returncode, log_path.read_text(errors="replace"))


def wait_within(process: subprocess.Popen, budget_s: float) -> str:
    """Waits for `process`, ending its group when the budget runs out or the check is stopped; returns the
    status."""
    deadline = time.monotonic() + budget_s
    while process.poll() is None:
        if STOP_REQUESTED.is_set() or time.monotonic() >= deadline:
            end_group(process)
            return "stopped" if STOP_REQUESTED.is_set() else "timed_out"
        time.sleep(POLL_S)
    signal_group(process, signal.SIGKILL)  # what outlived it would hold GPU memory the next stage needs
    return "ok" if process.returncode == 0 else "failed"


def end_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process's group (torchrun, its worker, the loader's workers), then SIGKILL to what is
    left of it."""
    signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    signal_group(process, signal.SIGKILL)
    process.wait()


def signal_group(process: subprocess.Popen, sent: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sent)
    except ProcessLookupError:
        pass  # the group is gone already


def failure_reason(outcome: Outcome, budget_s: float) -> str | None:
    """Why the stage failed, from how it ended and its log; None when it did not."""
    if FLEX_FALLBACK in outcome.log:
        return "flex attention ran without torch.compile (torch's unfused fallback): see the recompilations in the log"
    if outcome.status == "timed_out":
        return f"over its budget of {budget_s:.0f} s"
    if outcome.status == "stopped":
        return "the check was stopped (SIGTERM from run.sh's backstop, or SIGINT)"
    if outcome.status == "failed":
        return f"exit status {outcome.returncode}"
    return None


def log_tail(log: str, lines: int = 40, chars: int = 3000) -> str:
    """The last `lines` lines of a log, at most `chars` characters."""
    return "\n".join(log.rstrip().splitlines()[-lines:])[-chars:]


def run_stage(stage: Stage, out: Path) -> dict:
    """Runs one stage; returns its result: status, seconds, budget, recompilations, figures, and for a
    stage that did not finish well its reason and the tail of its log."""
    clear(stage.output)
    outcome = run_logged(stage.command, out / f"{stage.name}.log", stage.budget_s)
    result = {"kind": stage.kind, "status": outcome.status, "seconds": round(outcome.seconds, 1)}
    result |= {"budget_s": stage.budget_s, "recompiles": outcome.log.count(RECOMPILE)}
    try:
        result |= stage.figures()  # a stage that ran out of time may still have timed steps to show
    except StageIncomplete as missing:
        if outcome.status == "ok":
            result |= {"status": "failed", "reason": str(missing)}
    reason = failure_reason(outcome, stage.budget_s)
    if reason is not None:
        result |= {"status": "failed" if FLEX_FALLBACK in outcome.log else outcome.status, "reason": reason}
    if result["status"] != "ok":
        result["log_tail"] = log_tail(outcome.log)
    return result


def clear(path: Path | None) -> None:
    """Removes what an earlier run left at `path`."""
    if path is None:
        return
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def run_stages(stages: list[Stage], out: Path, results: dict, started: float) -> dict:
    """Runs the stages in order, writing the results after each; a stage left when the check is stopped is
    recorded as skipped. Returns the results."""
    for stage in stages:
        if STOP_REQUESTED.is_set():
            results[stage.name] = skipped(stage)
        else:
            results[stage.name] = run_stage(stage, out)
        results["seconds"] = round(time.perf_counter() - started, 1)
        write_results(out, results)
    return results


def skipped(stage: Stage) -> dict:
    """The result of a stage not run: the check was stopped before it."""
    return {"kind": stage.kind, "status": "skipped", "seconds": 0.0, "reason": "the check was stopped before it"}


def write_results(out: Path, results: dict) -> None:
    """results.json and summary.md, each replaced whole so that a kill mid-write leaves the former one."""
    replace_text(out / "results.json", json.dumps(results, indent=1))
    replace_text(out / "summary.md", summary(results))


def replace_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


# ---- the stages ----------------------------------------------------------------------------------------


def model_overrides(args) -> list[str]:
    if args.smoke:
        return ["model=tiny", "processor=tiny", "tokenizer=tiny"]
    return [
        "model=step3vl_10b",
        "processor=step3vl",
        "tokenizer=tiny",  # no hub here: the tiny tokenizer's ids, the released vocabulary size
        "model.image_token_id=5",  # the tiny tokenizer's <im_patch>
        f"model.vision_config.layers={args.vit_layers}",
        f"model.text_config.num_hidden_layers={args.layers}",
        f"model.text_config.max_window_layers={args.layers}",
    ]


def corpus(kind: str, out: Path, num: int) -> Path:
    target = out / "data" / kind
    if not target.exists():
        write_corpus(kind, str(target), num, seed=0, shard_size=50)
    return target


def training_stage(name: str, launcher: str, recipe: str, seq_len: int, grad_accum: int, data: Path, args) -> Stage:
    """torchrun with one process, as a user would, for `--warmup` + `--timed-steps` steps."""
    run_dir = args.out / name
    overrides = [
        f"+recipe={recipe}", *model_overrides(args), f"data.root={data}", f"data.packing.seq_len={seq_len}",
        "data.packing.window=2", f"trainer.grad_accum={grad_accum}",
        "trainer.sequence_parallel=1", "trainer.requires_init_from=false",
        f"trainer.max_steps={args.warmup + args.timed_steps}", "trainer.save_every=0",
        "optim.schedule.warmup_tokens=0", "logging.mode=disabled", f"trainer.output_dir={run_dir}",
    ]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(REPO / launcher)]
    estimated = estimate_gib(recipe, [o for o in overrides if not o.startswith(("data.root", "trainer.o"))], args)

    def figures() -> dict:
        return training_figures(run_dir / "metrics.jsonl", args.warmup) | estimated

    return Stage(name, "training", [*command, *overrides], args.budgets[name], figures, run_dir)


def estimate_gib(recipe: str, overrides: list[str], args) -> dict:
    """launch/estimate_memory.py's prediction for one GPU: {"estimate_gib": ...}, or the error that kept it
    from one (a side figure: it must not cost the stage its run)."""
    try:
        predicted, _ = estimate(recipe, ClusterConfig(gpus=1, gpu_memory_gb=args.gpu_memory_gb), overrides)
    except Exception as error:
        return {"estimate_error": f"{type(error).__name__}: {error}"}
    return {"estimate_gib": predicted.gpu_gib}


def training_figures(metrics_path: Path, warmup: int) -> dict:
    """Medians over the steps after the first `warmup`: tokens/s, TFLOP/s, MFU, peak memory, seconds a step
    and the share of it spent waiting for the loader (None where the rows lack `time/data_wait`)."""
    if not metrics_path.exists():
        raise StageIncomplete(f"no {metrics_path.name}")
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "tokens_per_s" in row]
    timed = rows[warmup:]
    if len(timed) < MIN_TIMED_STEPS:
        raise StageIncomplete(f"{len(timed)} timed steps after {warmup} warm-up, fewer than {MIN_TIMED_STEPS}")
    result = {"steps": len(rows), "timed_steps": len(timed), "last_loss": rows[-1]["loss"]}
    result["step_s"] = statistics.median(step_seconds(row) for row in timed)
    for key in TRAINING_FIGURES:
        if all(key in row for row in timed):
            result[key] = statistics.median(row[key] for row in timed)
    waits = [row["time/data_wait"] / step_seconds(row) for row in timed if "time/data_wait" in row]
    result["data_wait_share"] = statistics.median(waits) if len(waits) == len(timed) else None
    return result


def step_seconds(row: dict) -> float:
    """A step's seconds, loader wait included: the trainer's tokens/s is step_tokens over them."""
    return row["step_tokens"] / row["tokens_per_s"]


def rl_stage(args) -> Stage:
    data = corpus("rl", args.out, 40)
    overrides = [
        "stage=rlvr", "+recipe=rlvr", *model_overrides(args), f"prompts.root={data}", "prompts.prompts_per_step=2",
        "rollout.n=4", f"rollout.max_new_tokens={64 if args.smoke else 512}", "algo.minibatches=2",
        "trainer.world_size=1", f"trainer.output_dir={args.out / 'rl'}", "logging.mode=disabled",
    ]  # fmt: skip
    if not args.smoke:  # the critic beside the policy: two decoder layers fewer to fit one GPU
        overrides += ["model.text_config.num_hidden_layers=2", "model.text_config.max_window_layers=2",
                      "model.vision_config.layers=2"]  # fmt: skip
    script, row = str(REPO / "benchmarks/gpu/rl_iteration.py"), args.out / "rl.json"
    command = [sys.executable, script, str(args.out), "--iterations", str(RL_ITERATIONS), *overrides]
    return Stage("rl", "rl", command, args.budgets["rl"], lambda: rl_figures(row), row)


def rl_figures(path: Path) -> dict:
    """The timed (last) iteration's phase seconds (`time/*`), reward and memory; the iteration count, and the
    warm-up iterations' and the setup's seconds apart."""
    if not path.exists():
        raise StageIncomplete(f"no {path.name}")
    row = json.loads(path.read_text())
    result = {key: value for key, value in row.items() if key.startswith("time/") or key in RL_FIGURES}
    result |= {"iterations": row["iterations"], "timed_iteration": row["timed_iteration"]}
    return result | {"warmup": row["warmup"], "setup": row["setup"]}


def build_stages(args) -> list[Stage]:
    """The four stages, their corpora written."""
    short, long = (512, 2048) if args.smoke else (4096, 32768)
    pretrain = corpus("pretrain", args.out, 120 if args.smoke else 400)
    sft = corpus("sft", args.out, 120 if args.smoke else 600)
    return [
        training_stage("pretrain_4k", "launch/pretrain.py", "pretrain", short, 1, pretrain, args),
        training_stage("pretrain_4k_ga8", "launch/pretrain.py", "pretrain", short, 8, pretrain, args),
        training_stage("sft_32k", "launch/sft.py", "sft_stage1", long, 1, sft, args),
        rl_stage(args),
    ]


# ---- the summary ---------------------------------------------------------------------------------------


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"


def summary(results: dict) -> str:
    """The table BENCHMARKS.md takes: one row a stage run so far, the RL row last."""
    lines = [
        f"GPU check on {results['device']} ({results['date']}), {results.get('seconds', 0):.0f} s in all; "
        f"medians over {results.get('timed_steps', '?')} timed steps after {results.get('warmup', '?')} warm-up, "
        f"RL's last of {RL_ITERATIONS} iterations",
        "",
        "| stage | tokens/s | MFU torchtitan; causal (ViT / decoder) | data wait (share of step) "
        "| peak GiB (estimate) | s |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        if isinstance(result, dict) and "status" in result:
            lines.append(summary_row(name, result))
    return "\n".join(lines) + "\n"


def summary_row(name: str, result: dict) -> str:
    seconds = f"{result['seconds']:.0f}"
    if result["status"] != "ok":
        what = f"{result['status'].replace('_', ' ')}: {result.get('reason', '')}"
        log = "" if result["status"] == "skipped" else f"; see {name}.log"
        return f"| {name} | {what}{log} | | | | {seconds} |"
    if result["kind"] == "rl":
        phases = ", ".join(f"{k.removeprefix('time/')} {v:.1f}s" for k, v in result.items() if k.startswith("time/"))
        iteration = f"rl: RLVR iteration {result['timed_iteration']} of {result['iterations']}"
        return f"| {iteration} | {phases} | | | {number(result.get('memory/peak_gib'), '.1f')} | {seconds} |"
    mfu = "n/a"
    if "mfu" in result:
        parts = (result[k] for k in ("mfu", "mfu/causal", "mfu/vit", "mfu/decoder"))
        mfu = "{:.1%}; {:.1%} ({:.1%} / {:.1%})".format(*parts)
    peak = f"{number(result.get('memory/peak_gib'), '.1f')} ({number(result.get('estimate_gib'), '.1f')})"
    tokens, wait = number(result.get("tokens_per_s"), ",.0f"), number(result.get("data_wait_share"), ".1%")
    return f"| {name} | {tokens} | {mfu} | {wait} | {peak} | {seconds} |"


def number(value: float | None, spec: str) -> str:
    """`value` formatted, or "n/a"."""
    return "n/a" if value is None else format(value, spec)


# ---- main ----------------------------------------------------------------------------------------------


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="the CPU: tiny model, short rows")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of Qwen3-8B's width")
    parser.add_argument("--vit-layers", type=int, default=4, help="vision blocks of PE-lang's width")
    parser.add_argument("--warmup", type=int, help="untimed steps a training stage (default 2; smoke 1)")
    parser.add_argument("--timed-steps", type=int, help=f"timed steps, at least {MIN_TIMED_STEPS} (default 5; smoke 3)")
    parser.add_argument(
        "--budget", action="append", default=[], metavar="STAGE=SECONDS",
        help=f"a stage's time budget (defaults {GPU_BUDGETS_S}; smoke {SMOKE_BUDGET_S} each)",
    )  # fmt: skip
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    args = parser.parse_args()
    args.warmup = (1 if args.smoke else 2) if args.warmup is None else args.warmup
    args.timed_steps = (MIN_TIMED_STEPS if args.smoke else 5) if args.timed_steps is None else args.timed_steps
    if args.warmup < 0 or args.timed_steps < MIN_TIMED_STEPS:
        parser.error(f"--warmup must be >= 0 and --timed-steps >= {MIN_TIMED_STEPS}")
    try:
        args.budgets = budgets(args.budget, args.smoke)
    except ValueError as error:
        parser.error(str(error))
    return args


def budgets(given: list[str], smoke: bool) -> dict[str, float]:
    """Each stage's budget in seconds: the defaults, then the `STAGE=SECONDS` given."""
    result = dict.fromkeys(STAGES, SMOKE_BUDGET_S) if smoke else dict(GPU_BUDGETS_S)
    for item in given:
        name, _, seconds = item.partition("=")
        if name not in result or not seconds:
            raise ValueError(f"--budget {item}: expected STAGE=SECONDS with STAGE one of {', '.join(STAGES)}")
        result[name] = float(seconds)
    return result


def main() -> None:
    args = parse_arguments()
    args.out.mkdir(parents=True, exist_ok=True)
    for stop in (signal.SIGTERM, signal.SIGINT):  # the stages run in sessions of their own: stop them here
        signal.signal(stop, lambda *_: STOP_REQUESTED.set())
    register_recipes()
    started = time.perf_counter()
    results = {"device": device_name(), "date": time.strftime("%Y-%m-%d"), "warmup": args.warmup}
    results |= {"timed_steps": args.timed_steps, "budgets_s": args.budgets}
    results = run_stages(build_stages(args), args.out, results, started)
    print(summary(results))
    not_ok = [f"{name} ({results[name]['status']})" for name in STAGES if results[name]["status"] != "ok"]
    if not_ok:
        sys.exit(f"not ok: {', '.join(not_ok)}")


if __name__ == "__main__":
    main()
