"""The vLLM engine end to end, where vLLM and a GPU are present. This project's machines have neither, and
vLLM's wheel cannot be carried to the GPU machine it borrows, so this test has never run here: what can be
checked without a GPU (config, prompt expansion, weight names, transfer ranks) is in tests/contract."""

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (it needs CUDA torch)")
if not torch.cuda.is_available():
    pytest.skip("the vLLM engine needs a GPU", allow_module_level=True)

from rl.engines import SamplingParams, build_rollout_engine  # noqa: E402
from rl.engines.hf import HFEngine  # noqa: E402
from step3vl_train.processing.processor import load_processor  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.rl.test_engines import forward_logprobs, image_prompt  # noqa: E402


def test_vllm_expands_prompts_as_we_do_and_agrees_with_transformers(exported_tiny_model):
    # vLLM's processor has the released sizes built in (728 global view, 504 crops), whatever the model's
    # size; the tiny model's position table is interpolated to them, on both sides.
    processor_config = {**_yaml(REPO / "configs" / "processor" / "step3vl.yaml"), "crop_rule": "vllm"}
    processor = load_processor("tiny", processor_config)
    prompt = image_prompt(processor, size=(1024, 768))  # 4 crops and a row break
    engine = build_rollout_engine(
        "vllm", model=str(exported_tiny_model), tokenizer="tiny", pad_token_id=0,
        processor_config=processor_config, enforce_eager=True, gpu_memory_utilization=0.3,
    )  # fmt: skip
    sampling = SamplingParams(n=2, max_new_tokens=8, stop_token_ids=[])
    [completions] = engine.generate([prompt], sampling, seed=0)
    reference = HFEngine({}, str(exported_tiny_model), pad_token_id=0, dtype=torch.bfloat16, device="cuda")
    for completion in completions:
        scored = forward_logprobs(reference.model, prompt, completion.token_ids, sampling.temperature)
        assert torch.allclose(torch.tensor(completion.logprobs), scored.cpu().float(), atol=0.1)  # bf16 kernels


def _yaml(path):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))
