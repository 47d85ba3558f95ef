"""Every tensor of a training step reaches the engine's device, and every collective runs there.

No GPU here, so the `meta` device stands in for CUDA: a tensor left on the CPU is caught exactly where a
CUDA engine would fail on it (its forward, or an NCCL collective, which takes no CPU tensor), and meta
tensors need no data. The engine and the collectives below refuse anything that is not on that device.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from PIL import Image

from step3vl_train.processing.processor import collate
from step3vl_train.train.distributed import close_distributed
from step3vl_train.train.predictions import answer_prompts
from step3vl_train.train.sequence_parallel import DataParallelRank
from step3vl_train.train.trainer import backward_global_batch
from step3vl_train.train.validation import stand_in_batch

DEVICE = torch.device("meta")


def on_device(name: str, value) -> None:
    if torch.is_tensor(value):
        assert value.device == DEVICE, f"{name} is on {value.device}, not on the engine's device ({DEVICE})"


class DeviceEngine:
    """A DeepSpeed engine on DEVICE: refuses inputs elsewhere, returns a loss there."""

    device = DEVICE
    module = SimpleNamespace(dtype=torch.bfloat16)
    optimizer = SimpleNamespace(offload_optimizer=False, grad_partitions_flat_buffer=torch.zeros(4, device=DEVICE))

    def __init__(self):
        self.inputs = []

    def __call__(self, **inputs):
        for name, value in inputs.items():
            on_device(name, value)
        self.inputs.append(inputs)
        return SimpleNamespace(loss=torch.ones((), device=DEVICE, requires_grad=True) * 2)

    def backward(self, loss, scale_wrt_gas=True):
        on_device("the loss", loss)

    def step(self):
        pass


@pytest.fixture
def collectives_on_device(monkeypatch):
    """One rank's process group whose all-reduce, like NCCL's, takes device tensors only."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    reduced = []

    def all_reduce(tensor, *args, **kwargs):
        on_device("an all-reduced tensor", tensor)
        reduced.append(tensor)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    yield reduced
    close_distributed()


def image_batches(processor, count=2):
    photo = Image.open("data/samples/chelsea.png").convert("RGB")
    batches = []
    for index in range(count):
        images = [photo.resize((300 + 100 * index, 240))]
        content = [{"type": "image"}, {"type": "text", "text": "What is it?"}]
        answer = {"role": "assistant", "content": "A cat."}
        batches.append(collate([processor([{"role": "user", "content": content}, answer], images)], 0))
    return batches


def test_a_step_feeds_the_engine_and_the_collectives_on_its_device(tiny_processor, collectives_on_device):
    """A rank whose data ran out runs a stand-in on the device too; the gradients are scaled there."""
    engine = DeviceEngine()
    batches = [*image_batches(tiny_processor), None]
    totals = backward_global_batch(engine, batches, 3, DataParallelRank(0, 1, True), 8192.0, stand_in_batch(0))
    assert totals.device == DEVICE and totals.shape == (4,)
    assert len(engine.inputs) == 3
    assert all(inputs["pixel_values"].dtype == torch.bfloat16 for inputs in engine.inputs[:2])
    assert engine.inputs[0]["patch_pixel_values"] is not None  # crops too
    assert len(collectives_on_device) == 1  # the step's sums, once


def test_predictions_place_their_prompts_on_the_engines_device(tiny_processor):
    class DeviceModel:
        training, dtype = True, torch.bfloat16

        def eval(self):
            self.training = False

        def train(self, mode=True):
            self.training = mode

        def generate(self, **inputs):
            for name, value in inputs.items():
                on_device(name, value)
            return torch.zeros(1, inputs["input_ids"].shape[1] + 2, dtype=torch.long)

    model = DeviceModel()
    prompts = [{"image": "data/samples/chelsea.png", "text": "What is it?"}, {"image": None, "text": "12 + 30?"}]
    rows = answer_prompts(model, tiny_processor, prompts, max_new_tokens=2, device=DEVICE)
    assert [row["text"] for row in rows] == ["What is it?", "12 + 30?"] and model.training
