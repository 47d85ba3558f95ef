"""Our side of the rollout engine against vLLM 0.33's own code, on the CPU.

Not collected by the project's pytest (vLLM is not importable there): `test_vllm_contract.py` runs this
file in the contract environment, where vLLM is installed without its CUDA dependencies. Each test name
starts with the letter of the check it belongs to:
  (a) an export's config loads through vLLM's config path, as a STEP3-VL model, in a process that cannot
      import the project (as vLLM's engine and workers load it: through the export's own module);
  (b) vLLM's multimodal processor expands our prompts to exactly our token ids, and makes our pixels (crops
      padded black past the canvas included), over a sweep of image sizes;
  (c) every exported tensor loads, through vLLM's weight mapper, into a parameter of vLLM's model class;
  (d) the NCCL transfer group we lay out for N engines x TP is a valid group by vLLM's rank formula.
What needs CUDA (generation, NCCL, CUDA IPC) is not here: docs/rl.md says what has not run.
"""

import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
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

PRESETS = ["tiny", "step3vl_10b"]

# What vLLM's engine and workers do with an export, in a process that can no more import the project than they
# can: it loads the export's own `configuration_step_vl.py`, not the class `import step3vl_train` registers
# (which this pytest process has done). argv: the output file, then one model directory per preset.
CONFIG_PROBE = r"""
import importlib.abc, json, sys


class WithoutTheProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("step3vl_train", "rl"):
            raise ModuleNotFoundError(f"No module named {name!r} (the contract's config probe)", name=name)
        return None


sys.meta_path.insert(0, WithoutTheProject())  # before the editable install's finder
try:
    import step3vl_train  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the config probe can import step3vl_train")

from vllm.config import ModelConfig
from vllm.transformers_utils.config import get_config

found = []
for directory in sys.argv[2:]:
    config = get_config(directory, trust_remote_code=True)
    engine = ModelConfig(model=directory, tokenizer=directory, trust_remote_code=True, dtype="float32")
    model_class, _ = engine.registry.resolve_model_cls(engine.architectures, engine)
    hf_config = engine.hf_config  # what vLLM builds its model from
    found.append({
        "config_class": f"{type(config).__module__}.{type(config).__qualname__}",
        "engine_config_class": f"{type(hf_config).__module__}.{type(hf_config).__qualname__}",
        "model_type": config.model_type,
        "released": config.to_released_dict(),
        # Read attribute by attribute, as vLLM's model reads them, not through the module's own serialiser.
        "vision": {name: getattr(hf_config.vision_config, name) for name in hf_config.vision_config.to_dict()},
        "text": hf_config.text_config.to_dict(),
        "top": {name: getattr(hf_config, name) for name in ("image_token_id", "projector_bias",
                                                           "understand_projector_stride", "hidden_size")},
        "architectures": engine.architectures,
        "multimodal": engine.is_multimodal_model,
        "max_model_len": engine.max_model_len,
        "model_class": f"{model_class.__module__}.{model_class.__qualname__}",
        "project_modules": sorted(m for m in sys.modules if m.partition(".")[0] in ("step3vl_train", "rl")),
    })
with open(sys.argv[1], "w") as out:
    json.dump(found, out, default=str)
"""


def as_json(value):
    """`value` as it comes back through the probe's JSON (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(value, default=str))


@pytest.fixture(scope="module")
def vllm_loaded_configs(export, tmp_path_factory) -> dict[str, dict]:
    """Preset -> what CONFIG_PROBE found: the tiny export, and the full-size config beside the tiny tokenizer
    (no weights are needed to read it). The probe's path holds vLLM's folder only and its working directory
    is outside the repository; its HF modules cache is its own, so it copies the export's module afresh."""
    root = tmp_path_factory.mktemp("config-probe")
    directories = {"tiny": export}
    for preset in PRESETS[1:]:
        directories[preset] = root / preset
        directories[preset].mkdir()
        save_config(model_config(preset), directories[preset])
        load_tokenizer("tiny").save_pretrained(directories[preset])
    vllm_folder = Path(importlib.util.find_spec("vllm").origin).parents[1]
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env |= {"PYTHONPATH": str(vllm_folder), "VLLM_TARGET_DEVICE": "cpu", "HF_HOME": str(root / "hf")}
    env["HF_MODULES_CACHE"] = str(root / "hf" / "modules")
    found = root / "found.json"
    done = subprocess.run(
        [sys.executable, "-c", CONFIG_PROBE, str(found), *map(str, directories.values())],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"the config probe failed (exit {done.returncode}):\n{done.stderr[-6000:]}"
    return dict(zip(directories, json.loads(found.read_text()), strict=True))


@pytest.mark.parametrize("preset", PRESETS)
def test_a_export_config_loads_through_its_own_module(preset, vllm_loaded_configs):
    found = vllm_loaded_configs[preset]
    assert found["project_modules"] == []
    for key in ("config_class", "engine_config_class"):  # HF copies it into transformers_modules.<dir>.<hash>
        assert found[key].startswith("transformers_modules.")
        assert found[key].endswith(".configuration_step_vl.Step3VLConfig"), found[key]
    assert found["model_type"] == "step_robotics"
    ours = model_config(preset)
    released = found["released"]
    assert released.pop("auto_map")["AutoConfig"] == "configuration_step_vl.Step3VLConfig"
    assert released == as_json(ours.to_released_dict())


@pytest.mark.parametrize("preset", PRESETS)
def test_a_vllm_reads_our_fields_and_picks_its_step3vl_class(preset, vllm_loaded_configs):
    found, ours = vllm_loaded_configs[preset], model_config(preset)
    vision = {name: getattr(ours.vision_config, name) for name in ours.to_released_dict()["vision_config"]}
    assert {name: found["vision"][name] for name in vision} == as_json(vision)
    assert found["text"] == as_json(ours.text_config.to_dict())
    assert found["top"] == as_json({name: getattr(ours, name) for name in found["top"]})
    assert found["architectures"] == ["StepVLForConditionalGeneration"] and found["multimodal"]
    assert found["model_class"] == "vllm.model_executor.models.step_vl.StepVLForConditionalGeneration"
    assert found["max_model_len"] == ours.text_config.max_position_embeddings


# ---- (b) prompt expansion and pixels --------------------------------------------------------------------

# The spec's table and a grid of sizes over every branch of the crop plan (crops.py, vLLM's ImagePatcher):
# padded square first (a side under 32, more elongated than 4:1), no crops, a window of the short side, 504
# windows, the 20% snap of a canvas side (604 vs 605), the 4:1 boundary, the 3024 cap. Those in PADDED have
# crops that pass the canvas border.
SWEEP = IMAGE_TABLE + [
    (1, 1), (10, 500), (500, 10), (31, 200), (32, 200), (20, 1500),
    (100, 100), (300, 200), (301, 200), (200, 301), (700, 120),
    (727, 727), (729, 729), (727, 300),
    (504, 504), (1008, 504), (1007, 1007), (1008, 1008), (1009, 1009), (1512, 1008), (2016, 504),
    (604, 1000), (605, 1000), (1996, 499), (2000, 499), (2017, 504),
    (400, 1000), (999, 333), (1234, 567), (1080, 1920), (3025, 3025), (5000, 300), (300, 5000),
]  # fmt: skip
# Size -> (crop side, pixels past the canvas border): a 504 window over a canvas side shorter than it
# (worked by hand from the plan: long side >= 728, at most 4:1, short side under 504, kept as it is).
PADDED = {
    (728, 400): ("bottom", 104), (1000, 400): ("bottom", 104), (999, 333): ("bottom", 171),
    (1996, 499): ("bottom", 5), (400, 1000): ("right", 104),
}  # fmt: skip
PHOTO_SIZES = [(728, 728), (640, 480), (1024, 768), (2000, 300), (20, 1500), *PADDED]


def size_id(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


@pytest.fixture(scope="module")
def processors(export):
    from vllm.multimodal import MULTIMODAL_REGISTRY

    released = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "processor" / "step3vl.yaml"))
    return (
        load_processor("tiny", released),
        load_processor("tiny", {**released, "crop_rule": "vllm"}),
        MULTIMODAL_REGISTRY.create_processor(vllm_model_config(export)),
    )


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def image_prompt(processor, images: list[Image.Image], text: str = "What is in the pictures?") -> Prompt:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    processed = processor(messages, images, add_generation_prompt=True)
    return Prompt("k", "t", processed, messages, [png(image) for image in images], "math")


def solid_images(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    return [Image.new("RGB", size, (40 * i, 90, 160)) for i, size in enumerate(sizes)]


def gradient(size: tuple[int, int]) -> Image.Image:
    """Ramps across and down in red and green, 7x5-pixel stripes in blue: a misplaced or differently
    filtered resize moves every pixel, as a solid image would hide."""
    width, height = size
    x, y = np.arange(width)[None, :], np.arange(height)[:, None]
    red = np.broadcast_to(x * 255 // max(width - 1, 1), (height, width))
    green = np.broadcast_to(y * 255 // max(height - 1, 1), (height, width))
    blue = (x // 7 + y // 5) % 2 * 255
    return Image.fromarray(np.stack([red, green, blue], axis=-1).astype(np.uint8))


def vllm_processed(vllm_processor, request: dict) -> dict:
    items = vllm_processor.info.parse_mm_data(request.get("multi_modal_data", {}))
    return vllm_processor(request["prompt_token_ids"], items)


def vllm_expanded(vllm_processor, request: dict) -> list[int]:
    return list(vllm_processed(vllm_processor, request)["prompt_token_ids"])


def assert_same_pixels(vllm_item, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor | None]:
    """vLLM's global view and crops of the prompt's one image equal ours, to float32 rounding (we normalise
    after the last resize, vLLM before: the resize is linear). Returns ours."""
    mine = collate([prompt.sample], pad_token_id=0).model_inputs(with_labels=False)
    assert torch.allclose(vllm_item["pixel_values"].data, mine["pixel_values"][0], atol=1e-5)
    crops = mine["patch_pixel_values"]
    if crops is None:  # no crops: vLLM's field is empty
        assert vllm_item["patch_pixel_values"].data.numel() == 0
    else:
        assert vllm_item["patch_pixel_values"].data.shape == crops.shape
        assert torch.allclose(vllm_item["patch_pixel_values"].data, crops, atol=1e-5)
    return mine["pixel_values"][0], crops


@pytest.mark.parametrize("size", SWEEP, ids=size_id)
def test_b_vllm_plans_our_crops_and_pixels(size, processors):
    """Over the sweep: vLLM expands the prompt to exactly our token ids, and its views are our views."""
    _, ours, vllm_processor = processors
    prompt = image_prompt(ours, [gradient(size)])
    processed = vllm_processed(vllm_processor, vllm_request(ours, prompt))
    assert list(processed["prompt_token_ids"]) == prompt.sample.input_ids.tolist()
    [item] = processed["mm_kwargs"]["image"]
    assert int(item["num_patches"].data) == prompt.sample.num_patches[0]
    _, crops = assert_same_pixels(item, prompt)
    if size in PADDED:
        side, pixels = PADDED[size]
        assert black_border(crops, side, ours.config.mean, ours.config.std) == pixels


def test_b_several_images_in_one_prompt(processors):
    _, ours, vllm_processor = processors
    prompt = image_prompt(ours, solid_images([(1024, 768), (300, 200), (2000, 300)]))
    assert vllm_expanded(vllm_processor, vllm_request(ours, prompt)) == prompt.sample.input_ids.tolist()


def black_border(crops: torch.Tensor, side: str, mean, std) -> int:
    """How many rows at the bottom (`side` "bottom") or columns at the right ("right") of `crops` (n, 3, s, s,
    normalised) are black in every channel of every crop."""
    pixels = crops * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    black = (pixels.abs() < 0.5 / 255).all(dim=1).all(dim=0)  # (s, s)
    lines = (black.all(dim=1) if side == "bottom" else black.all(dim=0)).flip(0)  # from the border inwards
    return int(lines.int().cumprod(0).sum())


@pytest.mark.parametrize("size", PHOTO_SIZES, ids=size_id)
def test_b_vllm_sees_our_pixels(size, processors):
    """The views the trainer scores with are the ones vLLM sampled from: a real photo's global view and
    crops. Where crops pass the canvas border (PADDED), both pad them black by the same pixels."""
    _, ours, vllm_processor = processors
    photo = Image.open(REPO / "data" / "samples" / "chelsea.png").convert("RGB").resize(size)
    prompt = image_prompt(ours, [photo], "What is it?")
    [item] = vllm_processed(vllm_processor, vllm_request(ours, prompt))["mm_kwargs"]["image"]
    _, crops = assert_same_pixels(item, prompt)
    if size in PADDED:
        side, pixels = PADDED[size]
        assert black_border(item["patch_pixel_values"].data, side, ours.config.mean, ours.config.std) == pixels
        assert black_border(crops, side, ours.config.mean, ours.config.std) == pixels


def test_b_the_released_rule_differs_from_vllm_at_728(processors):
    """Why `processor.crop_rule=vllm` exists: the released file keeps a 728x728 image whole (171 tokens),
    vLLM 0.33 cuts it into 4 crops (504)."""
    released, ours, vllm_processor = processors
    prompt = image_prompt(released, solid_images([(728, 728)]))
    assert vllm_expanded(vllm_processor, vllm_request(ours, prompt)) != prompt.sample.input_ids.tolist()


# ---- (c) weights ----------------------------------------------------------------------------------------


def one_rank_model_parallel() -> None:
    """vLLM's model-parallel group of one rank (gloo), once a process, over a file store: a fixed port may
    still be held by a run a minute before. Call it under `set_current_vllm_config`."""
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if not model_parallel_is_initialized():
        store = Path(tempfile.mkdtemp(prefix="vllm-gloo-")) / "store"
        init_distributed_environment(1, 0, f"file://{store}", 0, backend="gloo")
        initialize_model_parallel(1, 1)


def build_vllm_model(directory: Path, device: str):
    """vLLM's model class, built as its loader builds it (one rank, no tensor parallelism) on `device`."""
    from vllm.config import DeviceConfig, LoadConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.models.step_vl import StepVLForConditionalGeneration

    config = VllmConfig(
        model_config=vllm_model_config(directory), device_config=DeviceConfig("cpu"), load_config=LoadConfig()
    )
    with set_current_vllm_config(config):
        one_rank_model_parallel()
        with torch.device(device):
            return StepVLForConditionalGeneration(vllm_config=config)


_SCHEMAS: list[torch.library.Library] = []  # alive as long as the process: the ops they declare are


@pytest.fixture(scope="module")
def quick_gelu_schema() -> None:
    """vLLM's QuickGELU looks up its compiled kernel when built; the CUDA build of it cannot load into CPU
    torch. Declaring the schema lets the model be built (nothing here runs the kernel). Declared once a
    process: vllm_model_side.py declares it too, in whichever order the two run."""
    try:
        torch.ops._C.gelu_quick  # noqa: B018
    except AttributeError:
        _SCHEMAS.append(torch.library.Library("_C", "FRAGMENT"))
        _SCHEMAS[-1].define("gelu_quick(Tensor(a!) out, Tensor input) -> ()")


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
