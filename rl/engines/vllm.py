"""The vLLM engine (vLLM 0.33, GPUs): continuous batching, images as multi-modal data, weights replaced
in place through vLLM's weight-transfer API (NCCL between separate GPUs, CUDA IPC when colocated).

vLLM opens the model directory as it opens the released checkpoint: `architectures`
`StepVLForConditionalGeneration` picks its STEP3-VL class, and `auto_map` names the configuration module
beside `config.json` (ours in an export, StepFun's in a released directory), hence `trust_remote_code`.

vLLM expands each image's single `<im_patch>` itself, so it is given the chat-rendered prompt before
expansion; the expanded prompt it reports must equal ours token for token, or the trainer would score
other tokens than the engine sampled (checked on every request; tests/contract shows the two agree).
Log-probs are vLLM's `processed_logprobs`: after the temperature, as the trainer computes them, which is
why training rollouts sample the whole distribution (no top-p or top-k: rl/config.py refuses them).

Each engine has a seed of its own (rl/engines/__init__.py: `engine_options`), and each request carries one:
prompt i of a call gets `seed x 2^24 + i x n`, and vLLM gives its k-th response that plus k, so no two
responses of an iteration share their noise. Seeded requests make what a response samples depend on the
call, not on the engine's batching; the logits still do (vLLM's kernels are not batch-invariant), so vLLM
rollouts repeat only approximately. The `hf` engine repeats exactly.

vLLM is imported here only: the rest of the project runs without it.
"""

from __future__ import annotations

import io
import itertools
import threading

from PIL import Image

from rl.engines.base import SamplingParams, whole_groups
from rl.experience import Completion, Prompt
from step3vl_train.processing.chat import render_chat
from step3vl_train.processing.processor import load_processor


def vllm_request(processor, prompt: Prompt) -> dict:
    """What vLLM is given for a prompt: the chat-rendered ids with one `<im_patch>` an image, and the images."""
    ids, _ = render_chat(processor.tokenizer, prompt.messages, True, processor.chat_template)
    request = {"prompt_token_ids": ids}
    if prompt.images:
        request["multi_modal_data"] = {"image": [Image.open(io.BytesIO(data)).convert("RGB") for data in prompt.images]}
    return request


def request_seed(seed: int, index: int, n: int) -> int:
    """Prompt `index`'s seed in a call seeded `seed`; vLLM seeds its k-th response with this plus k."""
    return (seed * 2**24 + index * n) % 2**63


class PromptMismatchError(RuntimeError):
    """vLLM expanded a prompt into other tokens than our processor."""


def check_prompt(prompt: Prompt, expanded, prefix: list[int]) -> None:
    """vLLM's expanded prompt (`expanded`) must be ours followed by `prefix` (a paused row's tokens)."""
    if list(expanded) != prompt.sample.input_ids.tolist() + prefix:
        raise PromptMismatchError(f"{prompt.key}: vLLM's expanded prompt differs from the processor's")


def vllm_sampling(sampling: SamplingParams, n: int, max_tokens: int, seed: int, **options):
    """vLLM's sampling parameters for our `sampling`: the sampled token's own log-prob, image tokens never."""
    from vllm import SamplingParams as VLLMSamplingParams

    return VLLMSamplingParams(
        n=n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=max_tokens,
        stop_token_ids=sampling.stop_token_ids,
        logprobs=0,  # the sampled token's own log-prob
        logit_bias=dict.fromkeys(sampling.suppressed_token_ids, -100.0) or None,
        seed=seed,
        **options,
    )


def row_sampling(sampling: SamplingParams, written: int, seed: int):
    """A partial row's request: what is left of its budget, its output as deltas (an abort keeps them)."""
    from vllm.sampling_params import RequestOutputKind

    return vllm_sampling(sampling, 1, sampling.max_new_tokens - written, seed, output_kind=RequestOutputKind.DELTA)


class RowRequest:
    """One partial row in flight: its tokens and log-probs as vLLM's delta outputs bring them."""

    def __init__(self, request_id: str, prompt: Prompt, prefix: Completion | None):
        self.request_id, self.prompt = request_id, prompt
        self.prefix = list(prefix.token_ids) if prefix else []
        self.token_ids, self.logprobs = list(self.prefix), list(prefix.logprobs) if prefix else []
        self.finish_reason: str | None = None
        self.checked = False  # the expanded prompt, on the first output (every delta output repeats it)

    def take(self, output) -> None:
        if not self.checked and output.prompt_token_ids is not None:
            check_prompt(self.prompt, output.prompt_token_ids, self.prefix)
            self.checked = True
        sample = output.outputs[0]
        self.token_ids += sample.token_ids
        self.logprobs += [step[t].logprob for t, step in zip(sample.token_ids, sample.logprobs or [], strict=True)]
        if output.finished and sample.finish_reason not in ("abort", "error"):  # cut short by vLLM: "paused"
            self.finish_reason = "length" if sample.finish_reason == "length" else "stop"

    def completion(self) -> Completion:
        return Completion(self.token_ids, self.logprobs, self.finish_reason or "paused")


class VLLMEngine:
    def __init__(
        self,
        model: str,
        tokenizer: str,
        pad_token_id: int,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.6,
        enforce_eager: bool = False,
        max_model_len: int | None = None,
        weight_transfer: str = "nccl",  # "ipc" when the engine shares its GPUs with the trainer
        processor_config: dict | None = None,
        seed: int = 0,
    ):
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError("rollout.engine=vllm needs vLLM (pip install 'step3vl-train[gpu]')") from error
        if not model:
            raise ValueError("the vLLM engine loads its first weights from rollout.model or policy.init_from: set one")
        self.processor = load_processor(tokenizer, processor_config)
        if self.processor.config.crop_rule != "vllm":
            raise ValueError("the vLLM engine needs processor.crop_rule=vllm, vLLM's own crop plan")
        self.llm = LLM(
            model=model,
            tokenizer=model,  # exports and released directories carry their tokenizer
            trust_remote_code=True,
            dtype="bfloat16",
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            max_model_len=max_model_len,
            enable_sleep_mode=True,
            logprobs_mode="processed_logprobs",
            weight_transfer_config={"backend": weight_transfer},
            seed=seed,
        )
        self.paused = threading.Event()  # set from another thread of the actor (rollout.partial)
        self.row_ids = itertools.count()

    def generate(self, prompts: list[Prompt], sampling: SamplingParams, seed: int) -> list[list[Completion]]:
        params = [
            vllm_sampling(sampling, sampling.n, sampling.max_new_tokens, request_seed(seed, index, sampling.n))
            for index in range(len(prompts))
        ]
        requests = [vllm_request(self.processor, prompt) for prompt in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        results = []
        for prompt, output in zip(prompts, outputs, strict=True):
            check_prompt(prompt, output.prompt_token_ids, [])
            results.append(
                [
                    Completion(
                        list(sample.token_ids),
                        [step[token].logprob for token, step in zip(sample.token_ids, sample.logprobs, strict=True)],
                        "length" if sample.finish_reason == "length" else "stop",
                    )
                    for sample in output.outputs
                ]
            )
        return results

    def generate_rows(
        self,
        rows: list[tuple[Prompt, Completion | None]],
        sampling: SamplingParams,
        seed: int,
        groups: list[int] | None = None,
        enough: int = 0,
    ) -> list[Completion]:
        """rollout.partial: a request a row, its prompt followed by the row's tokens so far, stepped here
        through vLLM's engine (`LLM.generate`'s own loop, with a stop): on `pause_generation`, or once
        `enough` groups are whole, the open requests are aborted and come back "paused" with what they
        wrote. Outputs stream as deltas, so an aborted request's tokens are known."""
        engine, requests = self.llm.llm_engine, []
        for index, (prompt, prefix) in enumerate(rows):
            request_id = f"row-{next(self.row_ids)}"
            done = list(prefix.token_ids) if prefix else []
            params = row_sampling(sampling, len(done), request_seed(seed, index, 1))
            request = vllm_request(self.processor, prompt)
            request["prompt_token_ids"] = request["prompt_token_ids"] + done
            engine.add_request(request_id, request, params)
            requests.append(RowRequest(request_id, prompt, prefix))
        by_id = {request.request_id: request for request in requests}
        while engine.has_unfinished_requests():
            whole = enough and whole_groups(groups, [r.finish_reason is not None for r in requests])
            if self.paused.is_set() or (enough and whole >= enough):
                engine.abort_request([r.request_id for r in requests if r.finish_reason is None])
                break
            for output in engine.step():
                by_id[output.request_id].take(output)
        return [request.completion() for request in requests]

    def pause_generation(self) -> None:
        self.paused.set()

    def resume_generation(self) -> None:
        self.paused.clear()

    # vLLM's weight-transfer control plane, driven by the trainer's sender through Ray (see rl/sync.py).
    def init_weight_transfer_engine(self, request) -> None:
        self.llm.init_weight_transfer_engine(request)

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, request) -> None:
        self.llm.update_weights(request)

    def finish_weight_update(self) -> int:
        self.llm.finish_weight_update()
        # Cached prefixes and image encodings were computed with the old weights.
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        return 0

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def sleep(self) -> None:
        self.llm.sleep(level=1)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.llm.wake_up(tags)
