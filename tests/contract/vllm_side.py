"""Our side of the rollout engine against vLLM 0.33's own code, on the CPU.

Not collected by the project's pytest (vLLM is not importable there): `test_vllm_contract.py` runs this
file in the contract environment, where vLLM is installed without its CUDA dependencies. Each test name
starts with the letter of the check it belongs to:
  (a) an export's config loads through vLLM's config path, as a STEP3-VL model;
  (b) vLLM's multimodal processor expands our prompts to exactly our token ids, and makes our pixels;
  (c) every exported tensor loads, through vLLM's weight mapper, into a parameter of vLLM's model class;
  (d) the NCCL transfer group we lay out for N engines x TP is a valid group by vLLM's rank formula.
What needs CUDA (generation, NCCL, CUDA IPC) is not here: docs/rl.md says what has not run.
"""

import io
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from rl.engines.vllm import vllm_request
from rl.experience import Prompt
from rl.sync import EngineFleetClient, trainer_init_info
from step3vl_train.model import Step3VLConfig, Step3VLForConditionalGeneration
from step3vl_train.model.checkpoint import read_released_tensors, save_config
from step3vl_train.processing.model_processor import save_processor
from step3vl_train.processing.processor import collate, load_processor
from step3vl_train.processing.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
# The spec's image table (STEP3VL_SPEC.md section 3): every size it works through.
IMAGE_TABLE = [
    (728, 728), (640, 480), (728, 400), (1000, 400), (1024, 768), (1280, 720), (1920, 1080), (2000, 300),
    (4032, 3024), (3024, 3024),
]  # fmt: skip


def model_config(name: str) -> Step3VLConfig:
    return Step3VLConfig.from_dict(OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml")))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny model written as `launch/export_hf.py` writes it: `save_pretrained` plus the processor (its
    tokenizer, chat template, processor_config.json and code)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("export") / "tiny"
    Step3VLForConditionalGeneration(model_config("tiny")).save_pretrained(out)
    save_processor(load_processor("tiny"), out)
    return out


def vllm_model_config(directory: Path, dtype: str = "float32"):
    from vllm.config import ModelConfig

    return ModelConfig(model=str(directory), tokenizer=str(directory), trust_remote_code=True, dtype=dtype)


# ---- (a) the config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "step3vl_10b"])
def test_a_export_config_loads_as_step3vl(preset, export, tmp_path):
    from vllm.model_executor.models.step_vl import StepVLForConditionalGeneration
    from vllm.transformers_utils.config import get_config

    directory = export
    if preset != "tiny":  # the full-size config beside the tiny tokenizer: no weights needed to read it
        directory = tmp_path / preset
        directory.mkdir()
        save_config(model_config(preset), directory)
        load_tokenizer("tiny").save_pretrained(directory)
    config = get_config(str(directory), trust_remote_code=True)
    assert type(config).__name__ == "Step3VLConfig" and config.model_type == "step_robotics"
    assert config.auto_map["AutoConfig"] == "configuration_step_vl.Step3VLConfig"
    # In this process `import step3vl_train` registered our class, which vLLM then prefers to the export's
    # module (its workers, which never import the package, load the module): the same code either way.
    assert type(config).__module__ in ("step3vl_train.model.config",) or type(config).__module__.endswith(
        "configuration_step_vl"
    )
    assert config.to_released_dict() == {**model_config(preset).to_released_dict(), "auto_map": config.auto_map}
    vllm_config = vllm_model_config(directory)
    assert vllm_config.architectures == ["StepVLForConditionalGeneration"]
    assert vllm_config.is_multimodal_model
    model_class, _ = vllm_config.registry.resolve_model_cls(vllm_config.architectures, vllm_config)
    assert model_class is StepVLForConditionalGeneration
    assert vllm_config.max_model_len == config.text_config.max_position_embeddings


# ---- (b) prompt expansion -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processors(export):
    from vllm.multimodal import MULTIMODAL_REGISTRY

    released = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "processor" / "step3vl.yaml"))
    return (
        load_processor("tiny", released),
        load_processor("tiny", {**released, "crop_rule": "vllm"}),
        MULTIMODAL_REGISTRY.create_processor(vllm_model_config(export)),
    )


def image_prompt(processor, sizes: list[tuple[int, int]]) -> Prompt:
    images = [Image.new("RGB", size, (40 * i, 90, 160)) for i, size in enumerate(sizes)]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "What is in the pictures?"}]
    messages = [{"role": "user", "content": content}]
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return Prompt("k", "t", processor(messages, images, add_generation_prompt=True), messages, encoded, "math")


def vllm_expanded(vllm_processor, request: dict) -> list[int]:
    items = vllm_processor.info.parse_mm_data(request.get("multi_modal_data", {}))
    return list(vllm_processor(request["prompt_token_ids"], items)["prompt_token_ids"])


@pytest.mark.parametrize("size", IMAGE_TABLE, ids=[f"{w}x{h}" for w, h in IMAGE_TABLE])
def test_b_vllm_expands_prompts_to_our_ids(size, processors):
    _, ours, vllm_processor = processors
    prompt = image_prompt(ours, [size])
    assert vllm_expanded(vllm_processor, vllm_request(ours, prompt)) == prompt.sample.input_ids.tolist()


def test_b_several_images_in_one_prompt(processors):
    _, ours, vllm_processor = processors
    prompt = image_prompt(ours, [(1024, 768), (300, 200), (2000, 300)])
    assert vllm_expanded(vllm_processor, vllm_request(ours, prompt)) == prompt.sample.input_ids.tolist()


@pytest.mark.parametrize("size", [(728, 728), (640, 480), (1024, 768), (2000, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_b_vllm_sees_our_pixels(size, processors):
    """The views the trainer scores with are the ones vLLM sampled from: a real photo's global view and
    crops, to float32 rounding (we normalise after the last resize, vLLM before: the resize is linear)."""
    _, ours, vllm_processor = processors
    photo = Image.open(REPO / "data" / "samples" / "chelsea.png").convert("RGB").resize(size)
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = Prompt("k", "t", ours(messages, [photo], add_generation_prompt=True), messages, [buffer.getvalue()], "m")
    request = vllm_request(ours, prompt)
    [item] = vllm_processor(
        request["prompt_token_ids"], vllm_processor.info.parse_mm_data(request["multi_modal_data"])
    )["mm_kwargs"]["image"]
    mine = collate([prompt.sample], pad_token_id=0).model_inputs(with_labels=False)
    assert torch.allclose(item["pixel_values"].data, mine["pixel_values"][0], atol=1e-5)
    crops = mine["patch_pixel_values"]
    if crops is None:  # no crops: vLLM's field is empty
        assert item["patch_pixel_values"].data.numel() == 0
    else:
        assert torch.allclose(item["patch_pixel_values"].data, crops, atol=1e-5)


def test_b_the_released_rule_differs_from_vllm_at_728(processors):
    """Why `processor.crop_rule=vllm` exists: the released file keeps a 728x728 image whole (171 tokens),
    vLLM 0.33 cuts it into 4 crops (504)."""
    released, ours, vllm_processor = processors
    prompt = image_prompt(released, [(728, 728)])
    assert vllm_expanded(vllm_processor, vllm_request(ours, prompt)) != prompt.sample.input_ids.tolist()


# ---- (c) weights ----------------------------------------------------------------------------------------


def build_vllm_model(directory: Path, device: str):
    """vLLM's model class, built as its loader builds it (one rank, no tensor parallelism) on `device`."""
    from vllm.config import DeviceConfig, LoadConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.model_executor.models.step_vl import StepVLForConditionalGeneration

    config = VllmConfig(
        model_config=vllm_model_config(directory), device_config=DeviceConfig("cpu"), load_config=LoadConfig()
    )
    with set_current_vllm_config(config):
        if not model_parallel_is_initialized():
            init_distributed_environment(1, 0, "tcp://127.0.0.1:29533", 0, backend="gloo")
            initialize_model_parallel(1, 1)
        with torch.device(device):
            return StepVLForConditionalGeneration(vllm_config=config)


@pytest.fixture(scope="module")
def quick_gelu_schema():
    """vLLM's QuickGELU looks up its compiled kernel when built; the CUDA build of it cannot load into CPU
    torch. Declaring the schema lets the model be built (nothing here runs the kernel)."""
    library = torch.library.Library("_C", "DEF")
    library.define("gelu_quick(Tensor(a!) out, Tensor input) -> ()")
    return library


def test_c_every_exported_tensor_loads_into_vllms_model(export, quick_gelu_schema):
    model = build_vllm_model(export, "cpu")
    ours = read_released_tensors(export)
    loaded = model.load_weights(ours.items())
    assert loaded == {name for name, _ in model.named_parameters()}
    vllm_params = dict(model.named_parameters())
    # The fused tensors hold ours: the decoder's q, k, v stacked; the encoder's in_proj as it is.
    attention = "model.layers.0.self_attn"
    stacked = torch.cat([ours[f"{attention}.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(vllm_params[f"language_model.{attention}.qkv_proj.weight"], stacked)
    block = "vision_model.transformer.resblocks.1"
    assert torch.equal(vllm_params[f"{block}.attn.qkv_proj.weight"], ours[f"{block}.attn.in_proj_weight"])
    assert torch.equal(vllm_params["vit_large_projector.weight"], ours["vit_large_projector.weight"])


def test_c_every_released_tensor_name_and_shape_maps_at_full_size(tmp_path, quick_gelu_schema):
    """The released checkpoint's 10B tensor list (spec), loaded as meta tensors into vLLM's full-size model."""
    directory = tmp_path / "step3vl_10b"
    directory.mkdir()
    save_config(model_config("step3vl_10b"), directory)
    load_tokenizer("tiny").save_pretrained(directory)
    model = build_vllm_model(directory, "meta")
    released = json.loads((REPO / "tests" / "model" / "step3vl_10b_tensors.json").read_text())["tensors"]
    tensors = [(name, torch.empty(shape, device="meta")) for name, shape in released.items()]
    assert model.load_weights(tensors) == {name for name, _ in model.named_parameters()}


# ---- (d) the NCCL transfer group ------------------------------------------------------------------------


@pytest.mark.parametrize("num_engines", [1, 2, 4])
@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_d_every_engine_worker_has_its_own_rank(num_engines, tensor_parallel_size):
    from vllm.config import ParallelConfig
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, _worker_group_rank
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    trainer = trainer_init_info("nccl", 0, num_engines, tensor_parallel_size, 2**28, "127.0.0.1", 29500)
    payload = NCCLTrainerWeightTransferEngine._build_worker_init_payload(trainer)  # what vLLM's trainer sends
    client = EngineFleetClient([object()] * num_engines, tensor_parallel_size)
    ranks = []
    for engine_payload in client.engine_init_infos(payload):
        worker = NCCLWeightTransferInitInfo(**engine_payload)  # as the worker parses it
        assert worker.world_size == trainer.world_size and worker.packed
        assert worker.packed_buffer_size_bytes == 2**28
        for rank in range(tensor_parallel_size):  # every engine is its own data-parallel index 0
            ranks.append(
                _worker_group_rank(
                    worker.rank_offset, ParallelConfig(tensor_parallel_size=tensor_parallel_size, rank=rank)
                )
            )
    assert sorted(ranks) == list(range(1, trainer.world_size))  # the sender is rank 0


def test_d_vllms_own_client_would_give_engines_the_same_ranks():
    """What the layout fixes: vLLM's Ray client hands every engine the same payload."""
    from vllm.config import ParallelConfig
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, _worker_group_rank
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    trainer = trainer_init_info("nccl", 0, 2, 1, 2**28, "127.0.0.1", 29500)
    worker = NCCLWeightTransferInitInfo(**NCCLTrainerWeightTransferEngine._build_worker_init_payload(trainer))
    assert _worker_group_rank(worker.rank_offset, ParallelConfig(tensor_parallel_size=1, rank=0)) == 1  # both


def test_d_ipc_is_packed_into_buckets():
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferInitInfo

    trainer = trainer_init_info("ipc", 0, 8, 1, 2**28, "127.0.0.1", 29500)
    assert trainer.packed and trainer.packed_buffer_size_bytes == 2**28
    assert IPCWeightTransferInitInfo(packed=trainer.packed).packed  # the worker side of the handshake
