"""The vLLM engine, where vLLM and a GPU are present (skipped on the CPU machines this project is built on)."""

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (it needs CUDA torch)")
if not torch.cuda.is_available():
    pytest.skip("the vLLM engine needs a GPU", allow_module_level=True)

from rl.engines import SamplingParams, build_rollout_engine  # noqa: E402
from rl.engines.hf import HFEngine  # noqa: E402
from tests.rl.test_engines import forward_logprobs, image_prompt  # noqa: E402


def test_vllm_expands_prompts_as_we_do_and_agrees_with_transformers(exported_tiny_model, tiny_processor):
    prompt = image_prompt(tiny_processor)
    engine = build_rollout_engine(
        "vllm", init_from=str(exported_tiny_model), tokenizer="tiny", pad_token_id=0,
        processor_config={"image_size": 224, "crop_size": 168, "max_image_size": 672}, enforce_eager=True,
    )  # fmt: skip
    sampling = SamplingParams(n=2, max_new_tokens=8, stop_token_ids=[])
    [completions] = engine.generate([prompt], sampling, seed=0)
    reference = HFEngine({}, str(exported_tiny_model), pad_token_id=0, dtype=torch.bfloat16, device="cuda")
    for completion in completions:
        scored = forward_logprobs(reference.model, prompt, completion.token_ids, sampling.temperature)
        assert torch.allclose(torch.tensor(completion.logprobs), scored, atol=0.1)  # bf16 kernels differ
