"""The per-rank memory estimate: every recipe fits 8 H100s (PaCoRe's 64K by sequence parallelism), the
arithmetic is what the docstring says, and the estimate matches a measured peak on the CPU."""

import re

import pytest

from benchmarks.memory_cpu import in_subprocess, trace_decoder_layer
from launch.estimate_memory import colocated_sync_estimate, engine_estimate, estimate, main
from step3vl_train.train.memory import ClusterConfig
from step3vl_train.train.recipes import register_recipes
from tests.conftest import REPO

GIB = 2**30
H100 = ClusterConfig(gpus=8, gpu_memory_gb=80)
# Colocated engines sleep while the trainer works: the recipe's rollouts ahead of the update are turned off.
COLOCATED = ["rollout.colocate=true", "algo.max_staleness=0", "rollout.partial=false"]
register_recipes()


def parts(result) -> dict[str, float]:
    return {part.name: part.bytes for part in result.gpu}


@pytest.mark.parametrize("recipe", ["phase1", "phase2", "sft_stage1", "sft_stage2", "rlvr", "rlhf", "pacore"])
def test_every_recipe_fits_eight_h100s_as_it_is(recipe):
    result, _ = estimate(recipe, H100, [f"+recipe={recipe}"])
    assert result.fits, result.table()
    assert result.gpu_gib > 30  # a 10B model's states alone are 23 GiB a rank


def test_pacore_at_64k_fits_by_sequence_parallelism_and_shared_rows_cost_no_memory():
    whole_rows, _ = estimate("pacore", H100, ["+recipe=pacore", "policy.sequence_parallel=1"])
    split, _ = estimate("pacore", H100, ["+recipe=pacore"])
    assert not whole_rows.fits and split.fits, (whole_rows.table(), split.table())
    assert parts(split)["decoder checkpoints"] * 4 == parts(whole_rows)["decoder checkpoints"]  # a quarter a rank
    # Shared rows keep to the same token budget: the same activations, and flex's block mask (4 MiB at 64K)
    rows_each, _ = estimate("rlvr", H100, ["+recipe=rlvr", "algo.shared_prompt=false"])
    shared, _ = estimate("rlvr", H100, ["+recipe=rlvr"])
    assert shared.gpu_gib - rows_each.gpu_gib < 0.01 and parts(shared)["flex block mask"] == 16 * 192**2


SP1 = "trainer.sequence_parallel=1"
# What docs and recipes quote of launch/estimate_memory.py: (file, the figure's pattern, the tool's
# arguments, GPUs, what it printed: "total", a part's name, or the sum of the parts whose names end so).
QUOTED = [
    ("docs/gpu.md", r"\| `pretrain` \(`phase1`, `phase2`\) \| 4,096 \| ([\d.]+) GiB", ["+recipe=phase1"], 8, "total"),
    ("docs/gpu.md", r"\| `sft_stage1`, `sft_stage2` \|[^|]+\| ([\d.]+) GiB", ["+recipe=sft_stage1"], 8, "total"),
    (
        "docs/gpu.md",
        r"\| the same at `trainer.sequence_parallel=1` \|[^|]+\| ([\d.]+) GiB",
        ["+recipe=sft_stage1", "trainer.sequence_parallel=1"],
        8,
        "total",
    ),
    ("docs/gpu.md", r"\| `rlvr` [^|]+\|[^|]+\| ([\d.]+) GiB", ["+recipe=rlvr"], 8, "total"),
    ("docs/gpu.md", r"([\d.]+) GiB a rank for the 128K recipes", ["+recipe=sft_stage1"], 8, "host"),
    (
        "recipes/sft_stage1.yaml",
        r"\+recipe=NAME: (\d+) GiB a rank",
        ["+recipe=sft_stage1", "trainer.sequence_parallel=1"],
        8,
        "total",
    ),
    ("recipes/sft_stage1.yaml", r"16K tokens each, (\d+) GiB a rank", ["+recipe=sft_stage1"], 8, "total"),
    (
        "recipes/sft_stage1.yaml",
        r"block inputs \((\d+) GiB\)",
        ["+recipe=sft_stage1", "compute.vision_checkpoint=blocks"],
        8,
        "vision block inputs",
    ),
    ("recipes/sft_stage1.yaml", r"\((\d+) GiB at its", ["+recipe=sft_stage1"], 8, "vision call recompute"),
    ("recipes/sft_stage2.yaml", r"16K tokens each, (\d+) GiB a rank", ["+recipe=sft_stage2"], 8, "total"),
    ("recipes/rlvr.yaml", r"come to (\d+) GiB a rank", ["+recipe=rlvr"], 8, "total"),
    ("recipes/pacore.yaml", r"DeepSpeed Ulysses\): (\d+) GiB a rank", ["+recipe=pacore"], 8, "total"),
    ("recipes/pacore.yaml", r"64K sequence: (\d+) GiB", ["+recipe=pacore", "policy.sequence_parallel=1"], 8, "total"),
    ("recipes/pacore.yaml", r"2 ranks a row: (\d+) GiB", ["+recipe=pacore", "policy.sequence_parallel=2"], 8, "total"),
    ("docs/pacore.md", r"That is (\d+) GiB a rank", ["+recipe=pacore"], 8, "total"),
    ("docs/pacore.md", r"would need (\d+) GiB", ["+recipe=pacore", "policy.sequence_parallel=1"], 8, "total"),
    ("docs/rl.md", r"checkpointing: ([\d.]+) GiB a training rank", ["+recipe=rlvr"], 8, "total"),
    ("docs/rl.md", r"([\d.]+) GiB of bf16 weights", ["+recipe=rlvr", "rollout=vllm"], 8, "engine: weights"),
    (
        "docs/rl.md",
        r"the training rank's ([\d.]+) GiB of ZeRO-3 states",
        ["+recipe=rlvr", "rollout=vllm", *COLOCATED],
        8,
        "colocated states",
    ),
]


def printed(args: list[str], gpus: int, what: str) -> float:
    cluster = ClusterConfig(gpus=gpus, gpu_memory_gb=80)
    result, cfg = estimate(args[0].removeprefix("+recipe="), cluster, args)
    if what == "total":
        return result.gpu_gib
    if what == "host":
        return result.host[0].bytes / GIB
    if what == "colocated states":
        engine = engine_estimate(cfg, cluster)
        return sum(p.bytes for p in engine.gpu if p.name.startswith(("policy:", "critic:"))) / GIB
    if what.startswith("engine:"):
        return parts(engine_estimate(cfg, cluster))[what] / GIB
    return parts(result)[what] / GIB


@pytest.mark.parametrize("path,pattern,args,gpus,what", QUOTED, ids=[f"{q[0]}:{q[4]}" for q in QUOTED])
def test_docs_and_recipes_quote_what_the_estimate_prints(path, pattern, args, gpus, what):
    match = re.search(pattern, (REPO / path).read_text())
    assert match, f"{path} no longer quotes {pattern}"
    quoted = match.group(1)
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    assert float(quoted) == round(printed(args, gpus, what), decimals), (path, quoted, what)


@pytest.mark.parametrize("tokens", [4096, 16384, 131072])
def test_a_decoder_layers_recompute_is_what_a_fake_tensor_trace_of_qwen3_8b_measures(tokens):
    """benchmarks/memory_cpu.py traces one Qwen3-8B layer recomputed in backward (flash attention's memory,
    no real tensors); the estimate's "decoder layer recompute" of a rank holding that many tokens."""
    trace = trace_decoder_layer(tokens)
    result, _ = estimate("phase1", H100, ["+recipe=phase1", f"data.packing.seq_len={tokens}"])
    assert parts(result)["decoder layer recompute"] == pytest.approx(trace["peak"] * tokens, rel=0.10)


def test_the_arithmetic_by_hand():
    result, _ = estimate("phase1", H100, ["+recipe=phase1"])
    got = parts(result)
    params = 10_172_000_000  # about; the estimate counts them exactly on the meta device
    assert got["model: parameters"] == pytest.approx(2 * params / 8, rel=1e-3)
    assert got["model: fp32 master + Adam"] + got["model: fp32 grad partitions"] == pytest.approx(
        16 * params / 8, rel=1e-3
    )
    assert got["decoder checkpoints"] == 36 * 4096 * 4096 * 2  # layers x tokens x hidden x bf16
    # a 2,048-position tile of the 151,936-token vocabulary at 10 B a logit, plus the head's weight grad
    assert got["loss tile"] == 2048 * 151936 * 10 + 151936 * 4096 * 2
    sp8, _ = estimate("sft_stage1", H100, ["+recipe=sft_stage1"])
    assert parts(sp8)["decoder checkpoints"] == 36 * (131072 // 8) * 4096 * 2


def test_the_rollout_engine_by_hand():
    _, cfg = estimate("rlvr", H100, ["+recipe=rlvr", "rollout=vllm"])
    engine = parts(engine_estimate(cfg, H100))
    assert engine["engine: weights"] == pytest.approx(2 * 10_172_000_000, rel=1e-3)  # bf16, TP 1
    assert engine["engine: KV cache"] == pytest.approx(0.6 * 80 * GIB - engine["engine: weights"])
    # 2 (k, v) x 36 layers x 8 KV heads x 128 x bf16 = 144 KiB a token
    result = engine_estimate(cfg, H100)
    assert "144 KiB a token" in result.table() and result.fits
    # Colocated, the training rank's states stay beside the engine: at 0.6 of the GPU they do not fit.
    _, colocated = estimate("rlvr", H100, ["+recipe=rlvr", "rollout=vllm", *COLOCATED])
    crowded = engine_estimate(colocated, H100)
    assert "policy: fp32 master + Adam" in parts(crowded) and not crowded.fits


def test_the_colocated_weight_sync_by_hand(capsys):
    """The sync's moment: the engine's weights are back, its KV cache not yet (the wake's two steps), and three
    buffers each the size of the largest tensor, 151,936 x 4,096 bf16 (1,187 MiB, above the 256 MiB bucket)."""
    _, cfg = estimate("rlvr", H100, ["+recipe=rlvr", "rollout=vllm", *COLOCATED])
    sync = colocated_sync_estimate(cfg, H100)
    got = parts(sync)
    embeddings = 151936 * 4096 * 2
    assert (
        got["sync: IPC buffer"] == got["sync: gathered bucket"] == got["sync: engine's copy of a chunk"] == embeddings
    )
    assert "engine: KV cache" not in got and sync.fits
    trainer = sum(p.bytes for p in sync.gpu if p.name.startswith(("policy:", "critic:", "trainer:")))
    assert sync.gpu_gib * GIB == pytest.approx(trainer + got["engine: weights"] + 3 * embeddings)
    main(["+recipe=rlvr", "rollout=vllm", *COLOCATED, "cluster.gpus=8"])
    assert (
        "weight sync (colocated, CUDA IPC; the engine's KV cache is woken after it), per GPU:"
        in capsys.readouterr().out
    )


def test_a_128k_row_on_one_rank_does_not_fit_and_the_degree_that_does_is_named(capsys):
    result, _ = estimate("sft_stage1", H100, ["+recipe=sft_stage1", "trainer.sequence_parallel=1"])
    assert not result.fits and result.gpu_gib > 110
    main(["+recipe=sft_stage1", "trainer.sequence_parallel=1", "cluster.gpus=8"])
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "it needs trainer.sequence_parallel=4" in out


@pytest.mark.slow
def test_the_estimate_matches_the_measured_peak_of_a_step_on_the_cpu():
    """A checkpointed forward and backward of a 4 x 256 decoder with the 151,936-token vocabulary and a
    vision tower, fp32, 4,096 tokens: peak RSS growth against the estimate, within 15%."""
    result = in_subprocess("step_region", 4096, 512, 2)
    assert result["measured_gib"] == pytest.approx(result["estimate_gib"], rel=0.15), result
