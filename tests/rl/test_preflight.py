"""The RL preflight: a missing or wrong model, or a cluster without the GPUs a config asks for, is one
message before any actor starts, never a hang or a crash retried."""

import re
import subprocess
import sys

import pytest

from rl.preflight import PreflightError, check_freeze, check_resources, check_resume, check_weights, gpus_needed
from tests.conftest import REPO
from tests.data.test_sources import write_shard
from tests.rl.compose import compose_rl

TINY = ["stage=rlvr", "model=tiny", "processor=tiny", "tokenizer=tiny"]
CPU_CLUSTER = {"CPU": 8.0}


def test_a_missing_init_from_is_refused_unless_training_from_scratch():
    with pytest.raises(PreflightError, match="policy.init_from is not set.*policy.from_scratch=true"):
        check_weights(compose_rl(*TINY))
    check_weights(compose_rl(*TINY, "policy.from_scratch=true"))


def test_model_directories_are_checked(exported_tiny_model, tmp_path):
    check_weights(compose_rl(*TINY, f"policy.init_from={exported_tiny_model}"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    for path, problem in [
        (tmp_path / "nowhere", "no such directory"),
        (tmp_path / "empty", "no config.json"),
        (tmp_path / "no_weights", "no model.safetensors.index.json or model.safetensors"),
    ]:
        with pytest.raises(PreflightError, match=f"policy.init_from={path}: {problem}"):
            check_weights(compose_rl(*TINY, f"policy.init_from={path}"))
    with pytest.raises(PreflightError, match="critic.init_from"):
        check_weights(compose_rl(*TINY, f"policy.init_from={exported_tiny_model}", f"critic.init_from={tmp_path}"))
    with pytest.raises(PreflightError, match="rollout.model"):
        check_weights(compose_rl(*TINY, "rollout=vllm", f"policy.init_from={exported_tiny_model}", "rollout.model=x"))


@pytest.mark.parametrize(
    ("prefix", "module"),
    [
        ("model.layers.0.self_attn.q_proj.", "model.layers.0.self_attn.qkv_proj"),
        ("model.layers.1.mlp.up_proj.", "model.layers.1.mlp.gate_up_proj"),
        (
            "vision_model.transformer.resblocks.0.attn.in_proj_bias",
            "vision_model.transformer.resblocks.0.attn.qkv_proj",
        ),
        ("vision_model.ln_pre.weight", "vision_model.ln_pre"),
    ],
)
def test_a_freeze_that_splits_a_module_vllm_loads_whole_is_refused(prefix, module):
    settings = [*TINY, "policy.from_scratch=true", "policy.image_feature_cache_mb=0", f"policy.freeze=[{prefix}]"]
    with pytest.raises(PreflightError, match=f"policy.freeze splits 1 module.*e.g. {re.escape(module)}: "):
        check_freeze(compose_rl(*settings, "rollout=vllm"))
    check_freeze(compose_rl(*settings))  # the transformers engine loads tensor by tensor: any freeze


@pytest.mark.parametrize(
    "freeze", ["[vision_model.]", "[vision_model.,model.layers.0.]", "[vision_model.,model.layers.1.self_attn.]"]
)
def test_whole_module_freezes_pass(freeze):
    check_freeze(compose_rl(*TINY, "policy.from_scratch=true", "rollout=vllm", f"policy.freeze={freeze}"))


@pytest.mark.parametrize(
    ("overrides", "gpus"),
    [
        ([], 0),  # the CPU default: the transformers engine, gloo ranks
        (["rollout=vllm", "rollout.num_engines=4", "rollout.tensor_parallel_size=2"], 8),  # CPU ranks, GPU engines
        (["rollout=vllm", "trainer.world_size=8", "trainer.num_gpus_per_rank=1", "rollout.num_engines=4"], 12),
        (["rollout=vllm", "trainer.world_size=8", "trainer.num_gpus_per_rank=1", "rollout.colocate=true"], 8),
    ],
)
def test_gpus_needed(overrides, gpus):
    assert gpus_needed(compose_rl(*TINY, "policy.from_scratch=true", *overrides)) == gpus


def test_a_cluster_without_the_gpus_is_refused():
    cfg = compose_rl(*TINY, "policy.from_scratch=true", "rollout=vllm")
    with pytest.raises(PreflightError, match="needs 1 GPUs .* the Ray cluster has 0. Without GPUs, run rollout=hf"):
        check_resources(cfg, CPU_CLUSTER)
    check_resources(cfg, {**CPU_CLUSTER, "GPU": 1.0})
    check_resources(compose_rl(*TINY, "policy.from_scratch=true"), CPU_CLUSTER)


@pytest.mark.slow
def test_rl_run_says_what_is_wrong_and_stops(exported_tiny_model, tmp_path):
    """rl/run.py on this GPU-less machine: vLLM waited on Ray's autoscaler forever, a wrong path was retried
    as three actor crashes. Now each is its message, at once, without a traceback: preflight checks (the
    others are the same path; their messages are tested above) and a mistake in the command."""
    shard = write_shard(tmp_path / "prompts-0.tar", ["k"])
    cases = [
        (["rollout=vllm", f"policy.init_from={exported_tiny_model}", f"prompts.train={shard}"], "needs 1 GPUs"),
        (["run.max_steps=3"], "run.max_steps is now trainer.max_steps"),
        (
            [f"prompts.root={tmp_path / 'nowhere'}"],
            r"prompts.root=.*nowhere is not a directory. The prompts sources expect",
        ),
    ]
    for overrides, message in cases:
        out = [] if any(o.startswith("trainer.output_dir=") for o in overrides) else [f"trainer.output_dir={tmp_path}"]
        done = subprocess.run([sys.executable, str(REPO / "rl" / "run.py"), *TINY, *out, *overrides],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 1
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and re.search(message, errors[0]), done.stderr[-3000:]
        assert "Traceback" not in done.stderr and "restarting" not in done.stderr


def test_resuming_with_another_world_size_is_refused(tmp_path):
    """Before: `The size of tensor a (16384) must match the size of tensor b (8192)` from DeepSpeed."""
    from omegaconf import OmegaConf

    out = tmp_path / "run"
    (out / "checkpoints" / "step_4").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_4")
    OmegaConf.save(OmegaConf.create({"run": {"world_size": 2}}), out / "config.yaml")
    check_resume(compose_rl(*TINY, f"trainer.output_dir={out}", "trainer.world_size=2"))
    with pytest.raises(PreflightError, match="resumes from step_4, written by trainer.world_size=2 .* this run has 4"):
        check_resume(compose_rl(*TINY, f"trainer.output_dir={out}", "trainer.world_size=4"))
    check_resume(compose_rl(*TINY, f"trainer.output_dir={tmp_path / 'fresh'}", "trainer.world_size=4"))
