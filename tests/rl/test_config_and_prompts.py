"""The RL config composes (stage, recipe, tiny model) and checks itself; the prompt loader skips and resumes."""

import json

import pytest
from webdataset import TarWriter

from rl.prompts import PromptLoader
from step3vl_train.processing.model_processor import save_processor, saved_settings
from step3vl_train.processing.processor import load_processor
from step3vl_train.usage import UsageError
from tests.conftest import REPO
from tests.data.broken_data import png
from tests.rl.compose import compose_rl


def test_rlvr_recipe_carries_the_papers_numbers():
    cfg = compose_rl("stage=rlvr", "+recipe=rlvr")
    assert cfg.stage == "rlvr" and cfg.trainer.max_steps == 600
    assert (cfg.prompts.prompts_per_step, cfg.rollout.n) == (512, 16)
    assert cfg.prompts.max_prompt_tokens + cfg.rollout.max_new_tokens == 24 * 1024
    assert (cfg.algo.estimator, cfg.algo.gamma, cfg.algo.lam, cfg.algo.minibatches) == ("gae", 1.0, 1.0, 4)
    assert cfg.algo.tis_cap == 8.0 and cfg.uses_critic
    assert (cfg.policy.optim.lr, cfg.critic.optim.lr) == (2e-6, 5e-6)
    assert cfg.policy.freeze == ["vision_model."]
    assert [s.name for s in cfg.prompts.sources] == ["math", "geometry", "counting", "grounding", "pointing", "choice"]


def test_the_policys_export_gives_the_processor_unless_one_is_given(tmp_path):
    tiny = str(REPO / "configs" / "processor" / "tiny.yaml")
    save_processor(load_processor("tiny", tiny), tmp_path)  # what an export of a tiny run carries
    cfg = compose_rl("stage=rlvr", "model=tiny", f"policy.init_from={tmp_path}")
    assert cfg.processor == saved_settings(tmp_path) and cfg.processor["image_size"] == 224
    assert compose_rl("stage=rlvr", "model=tiny", f"policy.init_from={tmp_path}", "rollout=vllm").processor == {
        **saved_settings(tmp_path),
        "crop_rule": "vllm",
    }
    with pytest.raises(UsageError, match="processor: the processor has image_size=728 .* drop processor"):
        compose_rl("stage=rlvr", "model=tiny", f"policy.init_from={tmp_path}", "processor=step3vl")


def test_cpu_overrides_and_options():
    cfg = compose_rl("stage=rlvr", "model=tiny", "processor=tiny", "rollout=vllm", "algo.estimator=grpo")
    assert cfg.rollout.engine == "vllm" and cfg.model["text_config"]["hidden_size"] < 1024
    assert cfg.processor["crop_rule"] == "vllm" and cfg.processor["image_size"] == 224  # vLLM's rule, tiny sizes
    assert cfg.algo.estimator == "grpo" and not cfg.uses_critic


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algo.estimator=ppo2"], "algo.estimator"),
        (["algo.estimator=grpo", "rollout.n=1"], "rollout.n >= 2"),
        (["critic.enabled=false"], "needs the critic"),
        (["prompts.prompts_per_step=3", "rollout.n=1"], "equal parts"),
        (["rollout.engine=sglang"], "rollout.engine"),
        (["rollout.engine=vllm"], "crop_rule=vllm"),
        (["algo.loss_aggregation=sum"], "loss_aggregation"),
        (["rollout.colocate=true"], "colocate"),
        (["prompts.sources=[]"], "prompts.sources is empty"),
        (["policy.micro_batch_tokens=0"], "policy.micro_batch_tokens must be positive"),
        (["rollout.top_p=0.9"], "rollout.top_p=0.9, rollout.top_k=0: training rollouts sample the whole"),
        (["rollout.top_k=50"], "importance ratios"),
        (["rollout.sync_timeout_s=0"], "rollout.sync_timeout_s must be positive"),
        (["algo.max_staleness=-1"], "algo.max_staleness must be at least 0"),
        (["rollout.partial=true"], "rollout.partial continues a response .* algo.max_staleness >= 1"),
        (["rollout.partial_extra=-0.5"], "rollout.partial_extra must be at least 0"),
        (["compute.attention=flash_attention_2"], "algo.shared_prompt=true .* compute.attention=auto"),
        (["policy.sequence_parallel=3"], "policy.sequence_parallel=3 must divide trainer.world_size=2"),
        (["trainer.world_size=4", "policy.sequence_parallel=2", "critic.sequence_parallel=1"], "set them equal"),
        (
            ["rollout=vllm", "rollout.colocate=true", "trainer.num_gpus_per_rank=1", "algo.max_staleness=1"],
            "colocated engines sleep then",
        ),
    ],
)
def test_bad_settings_are_refused_with_the_key(overrides, message):
    with pytest.raises(Exception, match=message):
        compose_rl("stage=rlvr", *overrides)


def test_evaluation_sampling_may_truncate():
    """Validation's responses are never trained on: its log-probs need not be the trainer's."""
    cfg = compose_rl("stage=rlvr", "rollout.eval.top_p=0.95", "rollout.eval.top_k=20")
    assert (cfg.rollout.eval.top_p, cfg.rollout.eval.top_k) == (0.95, 20)


def test_unknown_key_is_refused():
    with pytest.raises(Exception, match="not_a_key"):
        compose_rl("stage=rlvr", "+algo.not_a_key=1")


def write_prompt_shard(path, records):
    with TarWriter(str(path)) as writer:
        for key, record, images in records:
            writer.write({"__key__": key, "json": json.dumps(record).encode(), **images})


def user(text, image=False):
    return {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}


def test_prompt_loader_skips_what_cannot_be_a_prompt_and_resumes(tmp_path, tiny_processor, caplog):
    good = {"messages": [user("What is 1 + 1?")], "answer": "2", "reward": "math"}
    write_prompt_shard(
        tmp_path / "prompts.tar",
        [
            ("a", good, {}),
            ("b", {"messages": [user("Q?"), {"role": "assistant", "content": "A"}], "reward": "math"}, {}),
            ("c", {"messages": [user("no reward")], "answer": "1"}, {}),
            ("d", {"messages": [user("What?", image=True)], "answer": "1", "reward": "math"}, {"0.png": b"junk"}),
            ("e", {"messages": [user("long " * 400)], "answer": "1", "reward": "math"}, {}),
            ("f", {"messages": [user("Shape?", image=True)], "answer": "1", "reward": "grounding"}, {"0.png": png()}),
            ("g", good, {}),
            ("h", good, {}),
        ],
    )
    config = compose_rl("stage=rlvr", f"prompts.train={tmp_path}/prompts.tar", "prompts.max_prompt_tokens=256").prompts
    loader = PromptLoader(config, tiny_processor)
    first = loader.next_batch(2)
    assert [p.key.rsplit(":", 1)[1] for p in first] == ["a", "f"]
    assert first[1].image_size == (64, 48) and first[1].sample.pixels is not None
    assert first[0].question == "What is 1 + 1?" and first[0].task == "train"
    assert dict(loader.skips) == {"bad_schema": 2, "corrupt_image": 1, "too_long": 1}
    state = loader.state_dict()
    following = [p.key for p in loader.next_batch(3)]
    resumed = PromptLoader(config, tiny_processor)
    resumed.load_state_dict(state)
    assert [p.key for p in resumed.next_batch(3)] == following  # g, h, then the next epoch's first
    assert [p.key.rsplit(":", 1)[1] for p in resumed.next_batch(1)] == ["f"]  # past b..e again
    assert dict(resumed.skips) == {"bad_schema": 4, "corrupt_image": 2, "too_long": 2}
    assert resumed.samples.skip_log.unique() == {"bad_schema": 2, "corrupt_image": 1, "too_long": 1}
    logged = [r.getMessage() for r in caplog.records if r.name == "step3vl_train.data"]
    assert [m.split(" (")[0].rsplit(":", 1)[1] for m in logged] == ["b", "c", "d", "e"]  # each once, both passes
