"""The GPU check: the real entry points on one GPU, at the released widths and reduced depth, in bf16.

bash benchmarks/gpu/run.sh                       # on the device: wheels, then this, into $OUT
python benchmarks/gpu/check.py --out DIR         # the same, wherever the wheels are installed
python benchmarks/gpu/check.py --out DIR --smoke # the CPU: the tiny model and short rows (a test runs it)

Stages, each timed, with its results beside launch/estimate_memory.py's prediction for the same config:
1. `pretrain_4k`: launch/pretrain.py +recipe=pretrain on synthetic pre-training shards, 4,096-token packs.
2. `sft_32k`: launch/sft.py +recipe=sft_stage1 on synthetic SFT shards, 32,768-token packs: the chunked
   loss, the vision tower in chunks, flash or flex attention.
3. `rl`: one RLVR iteration with the transformers engine (benchmarks/gpu/rl_iteration.py).
The model: the released widths (PE-lang 1536 x 47 heads 16, Qwen3-8B's 4096 x 12288, 151,936 tokens)
with `--vit-layers` blocks and `--layers` decoder layers, so that one GPU holds its optimizer state.
Writes DIR/results.json and DIR/summary.md (the table BENCHMARKS.md takes); the first `--warmup` steps
of a run are left out of its medians (compilation, allocator growth).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from launch.estimate_memory import estimate  # noqa: E402
from step3vl_train.data.synthetic import write_corpus  # noqa: E402
from step3vl_train.train.memory import ClusterConfig  # noqa: E402
from step3vl_train.train.recipes import register_recipes  # noqa: E402


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


def train_run(name: str, launcher: str, recipe: str, seq_len: int, steps: int, data: Path, args) -> dict:
    """torchrun with one process, as a user would; the metrics rows come back."""
    run_dir = args.out / name
    overrides = [
        f"+recipe={recipe}", *model_overrides(args), f"data.root={data}", f"data.packing.seq_len={seq_len}",
        "data.packing.window=2", "data.num_workers=2", "trainer.grad_accum=1", "trainer.sequence_parallel=1",
        "trainer.requires_init_from=false", f"trainer.max_steps={steps}", "trainer.save_every=0",
        "optim.schedule.warmup_tokens=0", "logging.mode=disabled", f"trainer.output_dir={run_dir}",
    ]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(REPO / launcher)]
    started = time.perf_counter()
    done = subprocess.run([*command, *overrides], capture_output=True, text=True, env=environment())
    seconds = time.perf_counter() - started
    (args.out / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"failed": done.stderr.strip()[-2000:], "seconds": seconds}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = rows[args.warmup :] or rows
    result = {"seconds": seconds, "steps": len(rows), "last_loss": rows[-1]["loss"]}
    for key in ("tokens_per_s", "tflops_per_s", "mfu", "mfu/causal", "mfu/vit", "mfu/decoder", "memory/peak_gib"):
        if all(key in row for row in timed):
            result[key] = statistics.median(row[key] for row in timed)
    cluster = ClusterConfig(gpus=1, gpu_memory_gb=args.gpu_memory_gb)
    predicted, _ = estimate(recipe, cluster, [o for o in overrides if not o.startswith(("data.root", "trainer.o"))])
    result["estimate_gib"] = predicted.gpu_gib
    return result


def rl_run(args) -> dict:
    data = corpus("rl", args.out, 40)
    overrides = [
        "stage=rlvr", "+recipe=rlvr", *model_overrides(args), f"prompts.root={data}", "prompts.prompts_per_step=2",
        "rollout.n=4", f"rollout.max_new_tokens={64 if args.smoke else 512}", "algo.minibatches=2",
        "trainer.world_size=1", f"trainer.output_dir={args.out / 'rl'}", "logging.mode=disabled",
    ]  # fmt: skip
    if not args.smoke:  # the critic beside the policy: two decoder layers fewer to fit one GPU
        overrides += ["model.text_config.num_hidden_layers=2", "model.text_config.max_window_layers=2",
                      "model.vision_config.layers=2"]  # fmt: skip
    started = time.perf_counter()
    command = [sys.executable, str(REPO / "benchmarks/gpu/rl_iteration.py"), str(args.out), *overrides]
    done = subprocess.run(command, capture_output=True, text=True, env=environment())
    (args.out / "rl.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"failed": done.stderr.strip()[-2000:], "seconds": time.perf_counter() - started}
    row = json.loads((args.out / "rl.json").read_text())
    keep = ("reward_mean", "response_len_mean", "logprob_mismatch/max_abs", "memory/peak_gib")
    return {"seconds": time.perf_counter() - started} | {
        k: v for k, v in row.items() if k.startswith("time/") or k in keep
    }


def environment() -> dict:
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"


def summary(results: dict) -> str:
    lines = [f"GPU check on {results['device']} ({time.strftime('%Y-%m-%d')}), {results['seconds']:.0f} s in all", ""]
    header = "| stage | tokens/s | MFU torchtitan; causal (ViT / decoder) | peak GiB (estimate) | s |"
    lines += [header, "|---|---|---|---|---|"]
    for name in ("pretrain_4k", "sft_32k"):
        r = results[name]
        if "failed" in r:
            lines.append(f"| {name} | failed: see {name}.log | | | {r['seconds']:.0f} |")
            continue
        mfu = "n/a"
        if "mfu" in r:
            mfu = f"{r['mfu']:.1%}; {r['mfu/causal']:.1%} ({r['mfu/vit']:.1%} / {r['mfu/decoder']:.1%})"
        peak = f"{r['memory/peak_gib']:.1f}" if "memory/peak_gib" in r else "n/a"
        tokens = f"{r.get('tokens_per_s', 0):,.0f}"
        lines.append(f"| {name} | {tokens} | {mfu} | {peak} ({r['estimate_gib']:.1f}) | {r['seconds']:.0f} |")
    rl = results["rl"]
    if "failed" in rl:
        lines.append(f"| rl | failed: see rl.log | | | {rl['seconds']:.0f} |")
    else:
        phases = ", ".join(f"{k.removeprefix('time/')} {v:.1f}s" for k, v in rl.items() if k.startswith("time/"))
        peak = f"{rl['memory/peak_gib']:.1f}" if "memory/peak_gib" in rl else "n/a"
        lines.append(f"| rl: one RLVR iteration | {phases} | | {peak} | {rl['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="the CPU: tiny model, short rows")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of Qwen3-8B's width")
    parser.add_argument("--vit-layers", type=int, default=4, help="vision blocks of PE-lang's width")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    register_recipes()
    started = time.perf_counter()
    short, long = (512, 2048) if args.smoke else (4096, 32768)
    pretrain = corpus("pretrain", args.out, 120 if args.smoke else 400)
    sft = corpus("sft", args.out, 120 if args.smoke else 600)
    results = {"device": device_name()}
    steps = args.steps
    results["pretrain_4k"] = train_run("pretrain_4k", "launch/pretrain.py", "pretrain", short, steps, pretrain, args)
    results["sft_32k"] = train_run("sft_32k", "launch/sft.py", "sft_stage1", long, max(args.steps // 2, 2), sft, args)
    results["rl"] = rl_run(args)
    results["seconds"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = summary(results)
    (args.out / "summary.md").write_text(text)
    print(text)
    failed = [name for name, r in results.items() if isinstance(r, dict) and "failed" in r]
    if failed:
        sys.exit(f"failed: {failed}")


if __name__ == "__main__":
    main()
