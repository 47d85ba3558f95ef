"""Our weight sync against vLLM 0.33's own code, on the CPU (issue 29). Like vllm_side.py, not collected by
the project's pytest: it runs in the contract environment. Each test name starts with its check's letter:
  (e) a CUDA-IPC update message, built by our sender, crosses vLLM's msgpack encoder to the engine core;
  (f) vLLM's packed IPC producer takes every tensor of the 10B model in our IPC buffer;
  (g) vLLM's layerwise reload applies a trainable-only update, and leaves the frozen tower as it was;
  (h) a freeze that splits a module vLLM loads whole is refused, and our grouping is vLLM's modules.
CUDA is stood in for where vLLM's trainer side asks for it (`cuda_ipc_stand_in`); the bytes of an IPC
buffer never cross here, only the message that names it.
"""

import json
import pickle
import re
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from rl.config import ModelRoleConfig, RolloutConfig
from rl.engines import engine_environment
from rl.engines.fused import check_whole_modules, vllm_module
from rl.engines.vllm import VLLMEngine
from rl.sync import VLLMSender, full_bytes, ipc_buffer_bytes, sync_parameters, zero_weight_source
from step3vl_train.model import Step3VLForConditionalGeneration
from step3vl_train.model.checkpoint import read_released_tensors
from tests.contract import vllm_side
from tests.contract.vllm_side import build_vllm_model, model_config, one_rank_model_parallel, vllm_model_config

export = vllm_side.export  # the tiny export, as launch/export_hf.py writes it
quick_gelu_schema = vllm_side.quick_gelu_schema

REPO = Path(__file__).resolve().parents[2]
GPU_UUID = "GPU-00000000-1111-2222-3333-444444444444"
DEFAULT_FREEZE = ModelRoleConfig().freeze  # the vision tower


def rollout_config(**overrides) -> RolloutConfig:
    """configs/rollout/vllm.yaml's `rollout`, with `overrides`."""
    released = OmegaConf.load(REPO / "configs" / "rollout" / "vllm.yaml")["rollout"]
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RolloutConfig), released, overrides))


def policy(freeze: list[str], device: str = "cpu", preset: str = "tiny") -> Step3VLForConditionalGeneration:
    """The trained model as the trainer holds it: bf16, `freeze`'s prefixes not trained."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Step3VLForConditionalGeneration(model_config(preset)).to(torch.bfloat16)
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(tuple(freeze)))
    return model


@pytest.fixture(scope="module")
def vllm_on_cpu(quick_gelu_schema):
    """vLLM's model class buildable here: QuickGELU's schema, and the one-rank model-parallel group."""
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        one_rank_model_parallel()


# ---- CUDA, stood in for ---------------------------------------------------------------------------------


def reduce_cuda_tensor(tensor: torch.Tensor):
    """What torch's `reduce_tensor` returns for a CUDA tensor (torch/multiprocessing/reductions.py): the
    rebuild function and its 15 arguments, with the ones `storage._share_cuda_()` makes (the device index,
    the allocation's IPC handle, the ref counter's and the event's handles) made up, of the same types."""
    storage = tensor._typed_storage()
    return rebuild_cuda_tensor, (
        type(tensor),
        tensor.size(),
        tensor.stride(),
        tensor.storage_offset(),
        type(storage),
        tensor.dtype,
        0,  # the device index (an int)
        bytes(range(64)),  # cudaIpcMemHandle of the allocation
        tensor.untyped_storage().nbytes(),  # storage size, bytes
        0,  # storage offset in the allocation, bytes
        tensor.requires_grad,
        b"/torch_4242_1234567890_0",  # the ref counter's shared-memory file
        0,  # ref counter offset
        bytes(64),  # cudaIpcEventHandle
        True,  # event sync required
    )


class TorchWithBuffersOn:
    """`torch` as vLLM's packed IPC producer sees it: its one `torch.empty(..., device="cuda")` (the IPC
    buffer) lands on `device`; everything else is torch's."""

    def __init__(self, device: str):
        self.device = device

    def empty(self, *size, device=None, **kwargs):
        return torch.empty(*size, device=self.device if device == "cuda" else device, **kwargs)

    def __getattr__(self, name):
        return getattr(torch, name)


@contextmanager
def cuda_ipc_stand_in(buffer_device: str):
    """What vLLM's IPC trainer engine asks of CUDA, answered on the CPU: the device index and UUID, stream
    syncs, `ipc_collect`, the IPC buffer (on `buffer_device`) and `reduce_tensor` (`reduce_cuda_tensor`)."""
    from vllm.distributed.weight_transfer import packed_tensor

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.accelerator, "current_device_index", lambda: 0)
        patch.setattr(torch.accelerator, "current_stream", lambda: SimpleNamespace(synchronize=lambda: None))
        patch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid=GPU_UUID))
        patch.setattr(torch.cuda, "ipc_collect", lambda: None)
        patch.setattr(packed_tensor, "torch", TorchWithBuffersOn(buffer_device))
        patch.setattr(packed_tensor, "reduce_tensor", reduce_cuda_tensor)
        yield


# ---- a rollout actor whose vLLM stops at the engine core's socket ---------------------------------------


class EngineCoreSocket:
    """The engine-core process's end of the client's input socket: decodes each message as
    `EngineCoreProc`'s input thread does (a plain `MsgpackDecoder`) and answers every utility call."""

    def __init__(self, client):
        from vllm.v1.serial_utils import MsgpackDecoder

        self.client, self.decoder, self.calls = client, MsgpackDecoder(), []

    def send_multipart(self, message, copy=True):
        from vllm.v1.engine import EngineCoreRequestType

        _identity, request_type, *frames = message
        assert EngineCoreRequestType(request_type) == EngineCoreRequestType.UTILITY
        _client_index, call_id, method, args = self.decoder.decode(frames)
        self.calls.append((method, args))
        self.client.utility_results.pop(call_id).set_result(None)


def vllm_engine_to_socket() -> tuple[VLLMEngine, EngineCoreSocket]:
    """Our `VLLMEngine` over vLLM's own `LLM` -> `LLMEngine` -> `SyncMPClient` (the client of an engine core
    in a process of its own, vLLM's default), built without starting anything: what the client encodes
    goes to an `EngineCoreSocket`."""
    from vllm.entrypoints.llm import LLM
    from vllm.v1.engine.core_client import SyncMPClient
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.serial_utils import MsgpackEncoder

    client = object.__new__(SyncMPClient)
    client.encoder, client.core_engine, client.utility_results = MsgpackEncoder(), b"\x00\x00", {}
    client.resources = SimpleNamespace(engine_dead=False)
    client.input_socket = socket = EngineCoreSocket(client)
    renderer = SimpleNamespace(clear_mm_cache=lambda: None, _join_mm_warmup=lambda: None)
    llm, llm.llm_engine = object.__new__(LLM), object.__new__(LLMEngine)
    llm.renderer = llm.llm_engine.renderer = renderer
    llm.llm_engine.engine_core = client
    engine = object.__new__(VLLMEngine)
    engine.llm = llm
    return engine, socket


class ActorHandle:
    """A Ray actor handle over `engine`: `handle.method.remote(*args)` pickles the arguments as Ray does,
    records them, and runs the method at once (`ray.get` is the identity here)."""

    def __init__(self, engine):
        self.engine, self.received = engine, []

    def __getattr__(self, method):
        def remote(*args):
            args = pickle.loads(pickle.dumps(args))
            self.received.append((method, args))
            return getattr(self.engine, method)(*args)

        return SimpleNamespace(remote=remote)


@pytest.fixture
def ray_get_identity(monkeypatch):
    """`ray.get` of what `ActorHandle` returns: the result itself."""
    import ray

    monkeypatch.setattr(ray, "get", lambda refs: refs)


# ---- (e) the update message crosses vLLM's encoder ------------------------------------------------------


def sync_over_ipc(model, bucket_bytes: int) -> tuple[ActorHandle, EngineCoreSocket]:
    """`VLLMSender` (CUDA IPC) built for one engine, then a full and a trainable-only sync."""
    engine, socket = vllm_engine_to_socket()
    actor = ActorHandle(engine)
    with cuda_ipc_stand_in("cpu"):
        sender = VLLMSender(model, [actor], 0, bucket_bytes, "ipc", 1, "127.0.0.1", 0)
        sender.send(everything=True)
        sender.send(everything=False)
    return actor, socket


def test_e_vllms_encoder_refuses_an_ipc_update_without_our_environment(monkeypatch, ray_get_identity):
    """The defect: the handle holds `reduce_tensor`'s arguments (classes, a dtype), which vLLM's msgpack
    encoder refuses unless pickling is allowed; the engine's `update_weights` fails in the actor."""
    import vllm.envs

    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    assert not vllm.envs.VLLM_ALLOW_INSECURE_SERIALIZATION
    assert engine_environment(rollout_config(colocate=False)) == {}  # NCCL sends no handles
    with pytest.raises(TypeError, match="is not serializable"):
        sync_over_ipc(policy(DEFAULT_FREEZE), 2**16)


def test_e_an_ipc_update_crosses_to_the_engine_core_with_our_environment(monkeypatch, ray_get_identity):
    import vllm.envs
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine

    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    for variable, value in engine_environment(rollout_config(colocate=True)).items():
        monkeypatch.setenv(variable, value)
    model = policy(DEFAULT_FREEZE)
    actor, socket = sync_over_ipc(model, 2**16)
    assert vllm.envs.VLLM_ALLOW_INSECURE_SERIALIZATION  # what let it through: vLLM read our variable

    sent = [args[0].update_info for method, args in actor.received if method == "update_weights"]
    rpcs = [args for method, args in socket.calls if method == "collective_rpc"]
    # Every call the actor got reached the engine core, in order: the handshake, then two syncs.
    calls = [method for method, _ in actor.received]
    assert [rpc[0] for rpc in rpcs] == calls
    one_sync = "(start_weight_update (update_weights )+finish_weight_update )"
    assert re.fullmatch(f"init_weight_transfer_engine {one_sync}{{2}}", " ".join(calls) + " ")
    assert [method for method, _ in socket.calls].count("reset_prefix_cache") == 2
    assert rpcs[0][3] == {"init_info": {"packed": True}}
    received = [rpc[3]["update_info"] for rpc in rpcs if rpc[0] == "update_weights"]
    assert len(received) == len(sent) > 2  # several packed chunks a sync
    parse = object.__new__(IPCWeightTransferEngine).parse_update_info  # as the worker parses it
    names = []
    for ours, theirs in zip(sent, received, strict=True):
        info = parse(theirs)
        assert (info.names, info.dtype_names, info.shapes, info.tensor_sizes) == (
            ours["names"],
            ours["dtype_names"],
            ours["shapes"],
            ours["tensor_sizes"],
        )
        [(uuid, args)] = info.ipc_handles.items()
        assert uuid == GPU_UUID and len(args) == 15
        # msgpack has no tuples: the handle's tuples arrive as lists, which rebuild_cuda_tensor takes.
        assert [tuple(arg) if isinstance(arg, list) else arg for arg in args] == list(ours["ipc_handles"][uuid])
        names += info.names
    everything = [name for name, _ in model.named_parameters()]
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert names == everything + trainable


# ---- (f) the IPC buffer at 10B ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy_10b():
    """The 10B policy on the meta device, its tensors the released list's (tests/model)."""
    model = policy(DEFAULT_FREEZE, "meta", "step3vl_10b")
    released = json.loads((REPO / "tests" / "model" / "step3vl_10b_tensors.json").read_text())["tensors"]
    assert {name: list(param.shape) for name, param in model.named_parameters()} == released
    return model


def packed_chunks(parameters, buffer_bytes: int) -> list:
    """vLLM's packed IPC producer over `parameters` as our sender feeds it, with its buffer on meta."""
    from vllm.distributed.weight_transfer.packed_tensor import packed_ipc_producer

    source = zero_weight_source(parameters, 2**28)
    with cuda_ipc_stand_in("meta"):
        return list(packed_ipc_producer(source.iter_full(), GPU_UUID, lambda item: item[1], buffer_bytes))


def test_f_a_plain_bucket_refuses_the_largest_10b_tensors(policy_10b):
    """The defect: a buffer of `rollout.sync_bucket_mb` is smaller than the embeddings, the head and the
    second downsampler."""
    bucket = rollout_config().sync_bucket_mb * 2**20
    assert bucket == 256 * 2**20
    parameters = sync_parameters(policy_10b, everything=True)
    oversized = [(name, param) for name, param in parameters if full_bytes(param) > bucket]
    names = {name for name, _ in oversized}
    assert names == {"model.embed_tokens.weight", "lm_head.weight", "vision_model.vit_downsampler2.weight"}
    for name, param in oversized:
        with pytest.raises(ValueError, match=re.escape(f"Tensor '{name}'")):
            packed_chunks([(name, param)], bucket)
    with pytest.raises(ValueError, match="exceeds buffer_size_bytes"):
        packed_chunks(parameters, bucket)


class Recorder:
    """An engine that takes every call and does nothing."""

    def __getattr__(self, method):
        return lambda *args: None


def test_f_our_sender_packs_every_10b_tensor_into_its_ipc_buffer(policy_10b, ray_get_identity):
    bucket = rollout_config().sync_bucket_mb * 2**20
    actor = ActorHandle(Recorder())
    with cuda_ipc_stand_in("meta"):
        sender = VLLMSender(policy_10b, [actor], 0, bucket, "ipc", 1, "127.0.0.1", 0)
        buffer = sender.transfer.packed_buffer_size_bytes
        assert buffer == ipc_buffer_bytes(sync_parameters(policy_10b, everything=True), bucket) > bucket
        for everything in (True, False):
            actor.received.clear()
            sender.send(everything)
            chunks = [args[0].update_info for method, args in actor.received if method == "update_weights"]
            assert [name for chunk in chunks for name in chunk["names"]] == [
                name for name, _ in sync_parameters(policy_10b, everything)
            ]
            assert len(chunks) > 1 and all(sum(chunk["tensor_sizes"]) <= buffer for chunk in chunks)


# ---- (g) layerwise reload of a trainable-only update -------------------------------------------------------


@contextmanager
def uninitialised_memory_as_nan():
    """vLLM's layerwise reload rebuilds a module from `torch.empty_strided`: here that memory reads as NaN, so
    whatever an update leaves uninitialised is seen, every run."""
    from vllm.model_executor.model_loader.reload import meta

    materialize = meta.materialize_meta_tensor

    def materialize_as_nan(tensor):
        made = materialize(tensor)
        made.data.fill_(float("nan"))
        return made

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(meta, "materialize_meta_tensor", materialize_as_nan)
        yield


def update_by_reload(export, freeze: list[str], chunk: int = 5):
    """vLLM's model loaded from `export` (recorded for reloading as vLLM's `initialize_model` does), then one
    update of the tensors `freeze` leaves trainable, new values, `chunk` tensors a `load_weights` call, as
    `IPCWeightTransferEngine` applies it (start_weight_update, receive_weights, finish_weight_update).
    Returns (vLLM's parameters before, after, our tensors, the new ones)."""
    from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check
    from vllm.model_executor.model_loader.reload import (
        finalize_layerwise_reload,
        initialize_layerwise_reload,
        record_metadata_for_reloading,
    )

    model = build_vllm_model(export, "cpu")
    record_metadata_for_reloading(model)
    ours = read_released_tensors(export)
    model.load_weights(ours.items())
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    new = {
        name: tensor + torch.randn(tensor.shape, generator=generator)
        for name, tensor in ours.items()
        if not name.startswith(tuple(freeze))
    }
    updates = list(new.items())
    with uninitialised_memory_as_nan():
        initialize_layerwise_reload(model)
        for start in range(0, len(updates), chunk):
            with disable_mtp_completeness_check():
                model.load_weights(updates[start : start + chunk])
        finalize_layerwise_reload(model, vllm_model_config(export))
    after = {name: param.detach().clone() for name, param in model.named_parameters()}
    return before, after, ours, new


def test_g_vllm_reloads_a_trainable_only_update(export, vllm_on_cpu):
    before, after, ours, new = update_by_reload(export, DEFAULT_FREEZE)
    reference = build_vllm_model(export, "cpu")  # vLLM's plain load of what the update should leave
    reference.load_weights({**ours, **new}.items())
    for name, expected in reference.named_parameters():
        assert torch.equal(after[name], expected), name
    tower = [name for name in after if name.startswith("vision_model.")]
    assert tower and all(torch.equal(after[name], before[name]) for name in tower)  # bit for bit
    for layer in range(model_config("tiny").text_config.num_hidden_layers):
        ours_layer, theirs = f"model.layers.{layer}", f"language_model.model.layers.{layer}"
        qkv = torch.cat([new[f"{ours_layer}.self_attn.{p}_proj.weight"] for p in "qkv"])
        assert torch.equal(after[f"{theirs}.self_attn.qkv_proj.weight"], qkv)
        gate_up = torch.cat([new[f"{ours_layer}.mlp.{p}_proj.weight"] for p in ("gate", "up")])
        assert torch.equal(after[f"{theirs}.mlp.gate_up_proj.weight"], gate_up)


def test_g_a_split_module_comes_back_uninitialised(export, vllm_on_cpu):
    """Why (h) refuses such a freeze: with q frozen and k, v trained, vLLM rebuilds the fused qkv module from
    k and v alone, and q's rows are whatever the fresh allocation held."""
    _, after, ours, new = update_by_reload(export, [*DEFAULT_FREEZE, "model.layers.0.self_attn.q_proj."])
    qkv = after["language_model.model.layers.0.self_attn.qkv_proj.weight"]
    q = ours["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(qkv[: len(q)], q) and qkv[: len(q)].isnan().all()
    kv = torch.cat([new[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "kv"])
    assert torch.equal(qkv[len(q) :], kv)


# ---- (h) whole modules ---------------------------------------------------------------------------------------


SPLITTING = {
    "q/k/v": "model.layers.0.self_attn.q_proj.",
    "gate/up": "model.layers.0.mlp.gate_proj.",
    "in_proj weight/bias": "vision_model.transformer.resblocks.0.attn.in_proj_weight",
    "LayerNorm weight/bias": "vision_model.transformer.resblocks.0.ln_1.weight",
}
WHOLE = [DEFAULT_FREEZE, ["model.layers.0."], [*DEFAULT_FREEZE, "model.layers.0.self_attn."], ["lm_head."]]


@pytest.mark.parametrize("prefix", SPLITTING.values(), ids=SPLITTING.keys())
def test_h_a_freeze_that_splits_a_module_is_refused(prefix, export):
    names = read_released_tensors(export)
    with pytest.raises(ValueError, match="splits 1 module"):
        check_whole_modules((name, not name.startswith(prefix)) for name in names)
    with pytest.raises(ValueError, match="policy.freeze splits"):  # before anything reaches vLLM
        VLLMSender(policy([prefix]), [], 0, 2**20, "ipc", 1, "127.0.0.1", 0)


@pytest.mark.parametrize("freeze", WHOLE, ids=lambda freeze: ",".join(freeze))
def test_h_a_freeze_of_whole_modules_is_accepted(freeze, export):
    check_whole_modules((name, not name.startswith(tuple(freeze))) for name in read_released_tensors(export))


@pytest.fixture(scope="module")
def observed_modules(export, vllm_on_cpu) -> dict[str, str]:
    """Each exported tensor -> the vLLM module whose own parameters change when that tensor alone is loaded
    into vLLM's model."""
    model = build_vllm_model(export, "cpu")
    ours = read_released_tensors(export)
    model.load_weights(ours.items())
    parameters = dict(model.named_parameters())
    before = {name: param.detach().clone() for name, param in parameters.items()}
    modules = {}
    for name, tensor in ours.items():
        model.load_weights([(name, tensor + 1)])
        changed = [key for key, param in parameters.items() if not torch.equal(param, before[key])]
        assert changed, f"{name} changed nothing in vLLM's model"
        [modules[name]] = {key.rpartition(".")[0] for key in changed}
        before.update((key, parameters[key].detach().clone()) for key in changed)
    return modules


def test_h_our_modules_are_vllms(observed_modules):
    def partition(module_of) -> set[frozenset[str]]:
        groups = defaultdict(set)
        for name in observed_modules:
            groups[module_of(name)].add(name)
        return {frozenset(group) for group in groups.values()}

    assert partition(vllm_module) == partition(observed_modules.get)
    assert len(partition(vllm_module)) < len(observed_modules)  # some modules do hold several tensors


def test_h_the_tiny_model_has_every_kind_of_10b_tensor(export):
    """So the grouping checked on the tiny model holds at 10B."""
    released = json.loads((REPO / "tests" / "model" / "step3vl_10b_tensors.json").read_text())["tensors"]
    kinds = {re.sub(r"\.\d+\.", ".N.", name) for name in released}
    assert kinds == {re.sub(r"\.\d+\.", ".N.", name) for name in read_released_tensors(export)}
