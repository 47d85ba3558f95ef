"""Partial rollouts (rollout.partial) against vLLM 0.33's own engine front end, on the CPU. Letter (j).

Run as vllm_side.py is, in the contract environment. `VLLMEngine.generate_rows` drives `LLM.llm_engine`
itself: a request a row (`add_request`), `step` until done, `abort_request` on a pause or once enough groups
are whole. Here our engine runs that loop over a real `vllm.v1.engine.llm_engine.LLMEngine`, built by its
own `__init__` from the tiny export: its `add_request` (InputProcessor.process_inputs: vLLM's renderer and
STEP3-VL multimodal processor, its SamplingParams checks and updates, the external -> internal request id),
`step` and `abort_request` (OutputProcessor: detokenizer, log-probs, DELTA outputs, `abort_requests(ids,
internal=False)`) and `has_unfinished_requests`. Only the engine core, which needs the GPU, is stood in for
(`ScriptedCore`): it "samples" a script, but stops requests with vLLM's own `Request` and `check_stop`, as
the scheduler does, and lays out its outputs as the scheduler does (`EngineCoreOutput`, `LogprobsLists`).
  - a paused row's request reaches the core as our prompt followed by its tokens so far (the image's
    features on our image tokens), with what is left of its budget, DELTA outputs, n=1 and its own seed;
  - rows stream to their end: the tokens and log-probs sampled, after a prefix's; "length" at the budget,
    "stop" at a stop token, "paused" where vLLM ends a request itself ("abort", "error"); a pause aborts
    the open rows (their tokens so far, "paused") and a later call continues them to what an unpaused run
    gives; `enough` whole groups stop the rest;
  - `whole_groups` counts the groups whose rows have all finished;
  - the engine API the loop calls takes the arguments we pass, and `LLM` holds its engine as `llm_engine`.
"""

import ast
import inspect
import itertools
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from rl.engines.base import SamplingParams, whole_groups
from rl.engines.vllm import PromptMismatchError, RowRequest, VLLMEngine, check_prompt, request_seed
from rl.experience import Completion
from tests.contract import vllm_side
from tests.contract.vllm_side import image_prompt, solid_images, vllm_model_config

REPO = Path(__file__).resolve().parents[2]
export = vllm_side.export  # the tiny export, as launch/export_hf.py writes it
STOP = 2  # <|im_end|>, the tiny tokenizer's end token
SAMPLING = SamplingParams(max_new_tokens=6, stop_token_ids=[STOP], suppressed_token_ids=[5])


class ScriptedCore:
    """vLLM's engine core, stood in for. Each step it "samples" the next chunk of every running request's
    script (scripts in the order requests arrive; a chunk is a list of tokens, or a FinishReason the core
    ends the request with, as the scheduler's error path does) and stops requests as the scheduler's
    `_update_request_with_output` does. `after_step(steps)` runs after each step (a pause from "another
    thread")."""

    def __init__(self, scripts, max_model_len: int, after_step=None):
        self.scripts, self.max_model_len, self.after_step = scripts, max_model_len, after_step
        self.added, self.aborted, self.running, self.steps = [], [], {}, 0

    def add_request(self, request) -> None:
        from vllm.v1.request import Request

        self.added.append(request)
        script = iter(self.scripts[len(self.added) - 1])
        self.running[request.request_id] = (Request.from_engine_core_request(request, None), script)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.aborted += request_ids
        for request_id in request_ids:
            self.running.pop(request_id, None)

    def get_output(self):
        from vllm.v1.core.sched.utils import check_stop
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
        from vllm.v1.outputs import LogprobsLists

        chunks = {request_id: next(script) for request_id, (_, script) in self.running.items()}
        sampled = [[] if isinstance(chunk, FinishReason) else chunk for chunk in chunks.values()]
        flat = [token for chunk in sampled for token in chunk]
        logprobs = LogprobsLists(  # the model runner's, for the batch: the sampled token's own (logprobs=0)
            np.array([[token] for token in flat]),
            np.array([[logprob(token)] for token in flat], dtype=np.float32),
            np.ones(len(flat), dtype=np.int64),
            list(itertools.accumulate([0] + [len(chunk) for chunk in sampled])),
        )
        outputs = []
        for index, (request_id, chunk) in enumerate(chunks.items()):
            request = self.running[request_id][0]
            if isinstance(chunk, FinishReason):
                outputs.append(EngineCoreOutput(request_id, [], finish_reason=chunk))
                del self.running[request_id]
                continue
            new, stopped = list(chunk), False
            for count, token in enumerate(chunk, 1):
                request.append_output_token_ids(token)
                if stopped := check_stop(request, self.max_model_len):
                    del new[count:]
                    del self.running[request_id]
                    break
            outputs.append(
                EngineCoreOutput(
                    request_id,
                    new,
                    new_logprobs=logprobs.slice_request(index, len(new)),
                    finish_reason=request.get_finished_reason() if stopped else None,
                    stop_reason=request.stop_reason,
                )
            )
        self.steps += 1
        if self.after_step:
            self.after_step(self.steps)
        return EngineCoreOutputs(outputs=outputs)

    def dp_engines_running(self) -> bool:
        return False

    def get_supported_tasks(self):
        return ("generate",)

    def reset_mm_cache(self) -> None:
        pass


def logprob(token: int) -> float:
    """The log-prob the core reports for `token` (exact in float32, distinct a token)."""
    return -token / 256


def tokens(first: int, count: int) -> list[int]:
    return list(range(first, first + count))


@pytest.fixture(scope="module")
def vllm_config(export):
    from vllm.config import DeviceConfig, VllmConfig

    return VllmConfig(model_config=vllm_model_config(export), device_config=DeviceConfig("cpu"))


@pytest.fixture
def rollout(export, vllm_config, monkeypatch):
    """make(scripts, after_step=None) -> (our VLLMEngine, its vLLM LLMEngine, the ScriptedCore under it)."""
    import vllm
    from vllm.v1.engine.core_client import EngineCoreClient
    from vllm.v1.engine.llm_engine import LLMEngine

    processor_config = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "processor" / "step3vl.yaml"))

    def make(scripts, after_step=None):
        core = ScriptedCore(scripts, vllm_config.model_config.max_model_len, after_step)
        monkeypatch.setattr(EngineCoreClient, "make_client", staticmethod(lambda **_: core))
        llm_engine = LLMEngine(vllm_config, executor_class=None, log_stats=False, multiprocess_mode=True)
        monkeypatch.setattr(vllm, "LLM", lambda **_: SimpleNamespace(llm_engine=llm_engine), raising=False)
        engine = VLLMEngine(str(export), "tiny", 0, processor_config={**processor_config, "crop_rule": "vllm"})
        return engine, llm_engine, core

    return make


def prompts(processor):
    """An image prompt and a text-only one."""
    return image_prompt(processor, solid_images([(1024, 768)])), image_prompt(processor, [], "Two plus two?")


def prefix(token_ids: list[int]) -> Completion:
    return Completion(token_ids, [logprob(token) for token in token_ids], "paused")


def assert_completion(completion: Completion, token_ids: list[int], finish_reason: str) -> None:
    assert (completion.token_ids, completion.finish_reason) == (token_ids, finish_reason)
    assert completion.logprobs == [logprob(token) for token in token_ids]


# ---- (j) partial rollouts -------------------------------------------------------------------------------


def test_j_a_paused_rows_request_reaches_the_core_as_our_prompt_and_its_tokens(rollout):
    from vllm.sampling_params import RequestOutputKind

    engine, llm_engine, core = rollout([[], []])
    image, text = prompts(engine.processor)
    written = tokens(300, 3)
    engine.pause_generation()  # a call that starts paused adds its rows and aborts them at once
    done = engine.generate_rows([(image, prefix(written)), (text, None)], SAMPLING, seed=7)
    assert_completion(done[0], written, "paused")
    assert_completion(done[1], [], "paused")
    rows = zip(core.added, (image, text), (written, []), strict=True)
    for index, (request, prompt, prefix_ids) in enumerate(rows):
        assert request.external_req_id == f"row-{index}" and request.request_id != request.external_req_id
        check_prompt(prompt, request.prompt_token_ids, prefix_ids)  # vLLM's expanded prompt: ours, the row's
        params = request.sampling_params
        assert params.max_tokens == SAMPLING.max_new_tokens - len(prefix_ids)
        assert params.output_kind == RequestOutputKind.DELTA and params.n == 1 and params.logprobs == 0
        assert params.seed == request_seed(7, index, 1) and STOP in params.stop_token_ids
    with pytest.raises(PromptMismatchError):  # the check bites: the prefix is part of the expanded prompt
        check_prompt(image, core.added[0].prompt_token_ids, [])
    # The image's features go on our image tokens, none on the row's.
    [feature] = core.added[0].mm_features
    ours = image.sample.input_ids.tolist()
    start, mask = feature.mm_position.offset, feature.mm_position.is_embed
    embedded = {start + i for i, embed in enumerate(mask.tolist()) if embed}
    image_token = engine.processor.tokenizer.convert_tokens_to_ids("<im_patch>")
    assert embedded == {i for i, token in enumerate(ours) if token == image_token}
    assert core.added[1].mm_features is None
    # Aborted through vLLM's front end by our ids: the core is told its own.
    assert core.aborted == [request.request_id for request in core.added] and core.steps == 0
    assert not llm_engine.has_unfinished_requests()


def test_j_b_rows_stream_to_a_stop_or_their_budget(rollout):
    from vllm.v1.engine import FinishReason

    long, stop, last = tokens(100, 9), [*tokens(200, 2), STOP, 203], tokens(400, 4)
    scripts = [
        [long[:2], *([token] for token in long[2:])],  # 2 tokens the first step (a speculative step)
        [[token] for token in stop],
        [[token] for token in last],
        [[500], FinishReason.ERROR],  # ended by the core: cut short, to be continued
    ]
    engine, llm_engine, core = rollout(scripts)
    image, text = prompts(engine.processor)
    written = tokens(300, SAMPLING.max_new_tokens - 1)
    rows = [(image, None), (text, prefix(tokens(310, 2))), (image, prefix(written)), (text, None)]
    done = engine.generate_rows(rows, SAMPLING, seed=1)
    assert_completion(done[0], long[: SAMPLING.max_new_tokens], "length")
    assert_completion(done[1], tokens(310, 2) + stop[:3], "stop")  # the stop token is the response's
    assert_completion(done[2], written + last[:1], "length")  # the budget counts the row's tokens
    assert_completion(done[3], [500], "paused")
    assert core.aborted == [] and not llm_engine.has_unfinished_requests()


def test_j_c_a_pause_aborts_the_open_rows_and_a_later_call_continues_them(rollout):
    long, stop = tokens(100, 9), [200, STOP]
    engine, llm_engine, core = rollout(
        [[[token] for token in long], [[token] for token in stop], [[token] for token in long]],
        after_step=lambda steps: steps == 3 and engine.pause_generation(),
    )
    image, text = prompts(engine.processor)
    done = engine.generate_rows([(image, None), (text, None), (image, prefix([300]))], SAMPLING, seed=3)
    assert_completion(done[0], long[:3], "paused")
    assert_completion(done[1], stop, "stop")
    assert_completion(done[2], [300, *long[:3]], "paused")
    assert core.aborted == [core.added[0].request_id, core.added[2].request_id]
    assert not llm_engine.has_unfinished_requests()
    engine.resume_generation()
    core.scripts += [[[token] for token in long[3:]]] * 2  # the rows go on where they were
    again = engine.generate_rows([(image, done[0]), (image, done[2])], SAMPLING, seed=4)
    assert_completion(again[0], long[:6], "length")
    assert_completion(again[1], [300, *long[:5]], "length")
    check_prompt(image, core.added[3].prompt_token_ids, long[:3])


def test_j_d_enough_whole_groups_end_the_call(rollout):
    short, long = [[token] for token in [200, STOP]], [[token] for token in tokens(100, 9)]
    engine, _, core = rollout([short, short, long, short])
    image, text = prompts(engine.processor)
    rows = [(image, None), (text, None), (image, None), (text, None)]
    done = engine.generate_rows(rows, SAMPLING, seed=5, groups=[0, 0, 1, 1], enough=1)
    assert [c.finish_reason for c in done] == ["stop", "stop", "paused", "stop"]
    assert_completion(done[2], tokens(100, 2), "paused")
    assert core.aborted == [core.added[2].request_id]


def test_j_e_whole_groups_counts_groups_whose_rows_all_finished():
    requests = [RowRequest(f"row-{i}", None, None) for i in range(6)]
    for request, reason in zip(requests, ["stop", None, "length", "stop", None, "length"], strict=True):
        request.finish_reason = reason
    finished = [r.finish_reason is not None for r in requests]  # as generate_rows reads them
    assert whole_groups([0, 0, 1, 1, 2, 3], finished) == 2  # groups 1 and 3
    assert whole_groups(None, finished) == 0


def test_j_f_the_engine_api_our_loop_calls():
    from vllm import LLM
    from vllm.v1.engine.llm_engine import LLMEngine

    params = object()
    inspect.signature(LLMEngine.add_request).bind(None, "row-0", {"prompt_token_ids": [1]}, params)
    inspect.signature(LLMEngine.step).bind(None)
    inspect.signature(LLMEngine.has_unfinished_requests).bind(None)
    abort = inspect.signature(LLMEngine.abort_request)
    abort.bind(None, ["row-0"])
    assert abort.parameters["internal"].default is False  # our ids are the external ones
    init = ast.parse(textwrap.dedent(inspect.getsource(LLM.__init__))).body[0]
    sets = [node for node in ast.walk(init) if isinstance(node, ast.Assign)]
    engine = [node.value for node in sets if ast.unparse(node.targets[0]) == "self.llm_engine"]
    assert [ast.unparse(value.func) for value in engine] == ["LLMEngine.from_engine_args"]
    assert inspect.getmodule(LLM).LLMEngine is LLMEngine
