import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM

from step3vl_train.model.checkpoint import CheckpointMismatchError
from step3vl_train.model.parts import load_decoder_from_qwen3, load_vision_from_pe, resize_position_table


@pytest.mark.parametrize("tied", [False, True])
def test_decoder_from_qwen3_checkpoint(tiny_model, tmp_path, tied):
    text = tiny_model.config.text_config.to_dict()
    text["tie_word_embeddings"] = tied
    qwen = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in text.items() if k != "model_type"}))
    qwen.save_pretrained(tmp_path / "qwen3")
    vision_before = {k: v.clone() for k, v in tiny_model.vision_model.state_dict().items()}

    load_decoder_from_qwen3(tiny_model, tmp_path / "qwen3")

    for name, tensor in qwen.model.state_dict().items():
        assert torch.equal(tiny_model.model.state_dict()[name], tensor), name
    expected_head = qwen.model.embed_tokens.weight if tied else qwen.lm_head.weight
    assert torch.equal(tiny_model.lm_head.weight, expected_head)
    assert tiny_model.lm_head.weight.data_ptr() != tiny_model.model.embed_tokens.weight.data_ptr()
    for name, tensor in tiny_model.vision_model.state_dict().items():
        assert torch.equal(tensor, vision_before[name]), name


def test_decoder_shape_mismatch_names_the_fields(tiny_model, tmp_path):
    Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=1024,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden_size: 32 vs ours 64"):
        load_decoder_from_qwen3(tiny_model, tmp_path)


def meta_pe_checkpoint(vision_cfg, grid: int) -> dict[str, torch.Tensor]:
    """A PE-lang trunk as Meta's perception_models saves it, at a `grid` x `grid` position table."""
    width, hidden = vision_cfg.width, vision_cfg.mlp_width
    state = {
        "conv1.weight": torch.randn(width, 3, 14, 14),
        "positional_embedding": torch.randn(grid * grid, width),
        "ln_pre.weight": torch.randn(width),
        "ln_pre.bias": torch.randn(width),
    }
    for i in range(vision_cfg.layers):
        shapes = {
            "ln_1.weight": (width,),
            "ln_1.bias": (width,),
            "attn.in_proj_weight": (3 * width, width),
            "attn.in_proj_bias": (3 * width,),
            "attn.out_proj.weight": (width, width),
            "attn.out_proj.bias": (width,),
            "ls_1.gamma": (width,),
            "ln_2.weight": (width,),
            "ln_2.bias": (width,),
            "mlp.c_fc.weight": (hidden, width),
            "mlp.c_fc.bias": (hidden,),
            "mlp.c_proj.weight": (width, hidden),
            "mlp.c_proj.bias": (width,),
            "ls_2.gamma": (width,),
        }
        state.update({f"transformer.resblocks.{i}.{k}": torch.randn(s) for k, s in shapes.items()})
    return state


def test_vision_from_meta_pe_checkpoint_resizes_positions(tiny_model, tmp_path):
    vision_cfg = tiny_model.config.vision_config
    pe = meta_pe_checkpoint(vision_cfg, grid=10)
    # DDP-wrapped training state, as perception_models' loader accepts it.
    torch.save({"state_dict": {f"module.{k}": v for k, v in pe.items()}}, tmp_path / "pe.pt")
    projector_before = tiny_model.vit_large_projector.weight.clone()

    load_vision_from_pe(tiny_model, tmp_path / "pe.pt")

    loaded = tiny_model.vision_model.state_dict()
    for name, tensor in pe.items():
        if name != "positional_embedding":
            assert torch.equal(loaded[name], tensor), name
    grid = vision_cfg.grid_size
    expected = (
        F.interpolate(
            pe["positional_embedding"].T.reshape(1, -1, 10, 10), size=(grid, grid), mode="bilinear", align_corners=False
        )
        .reshape(vision_cfg.width, -1)
        .T
    )
    torch.testing.assert_close(loaded["positional_embedding"], expected)
    assert torch.equal(tiny_model.vit_large_projector.weight, projector_before)


def test_vision_from_pe_lists_unexpected_and_missing(tiny_model, tmp_path):
    pe = meta_pe_checkpoint(tiny_model.config.vision_config, grid=16)
    pe["attn_pool.probe"] = torch.zeros(1)
    del pe["ln_pre.bias"]
    torch.save(pe, tmp_path / "pe.pt")
    with pytest.raises(
        CheckpointMismatchError, match=r"missing \(1\): ln_pre\.bias.*unexpected \(1\): attn_pool\.probe"
    ):
        load_vision_from_pe(tiny_model, tmp_path / "pe.pt")


def test_position_table_resize_is_identity_on_its_own_grid():
    table = torch.randn(49, 8)
    assert resize_position_table(table, 7) is table
    with pytest.raises(ValueError, match="square"):
        resize_position_table(torch.randn(50, 8), 7)


def test_assemble_init_writes_a_model_phase_1_can_start_from(tiny_model, tmp_path):
    import subprocess
    import sys

    from step3vl_train.model import Step3VLForConditionalGeneration
    from tests.conftest import REPO

    text = tiny_model.config.text_config.to_dict()
    qwen = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in text.items() if k != "model_type"}))
    qwen.save_pretrained(tmp_path / "qwen3")
    pe = meta_pe_checkpoint(tiny_model.config.vision_config, grid=tiny_model.config.vision_config.grid_size)
    torch.save(pe, tmp_path / "pe.pt")
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "assemble_init.py"), "model=tiny", f"qwen3={tmp_path / 'qwen3'}",
         f"pe={tmp_path / 'pe.pt'}", f"out={tmp_path / 'init'}", "dtype=float32"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assembled = Step3VLForConditionalGeneration.from_pretrained(tmp_path / "init")
    assert torch.equal(assembled.model.layers[0].mlp.up_proj.weight, qwen.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(assembled.vision_model.conv1.weight, pe["conv1.weight"])
