"""Checkpoints: save → load gives the same outputs; an interrupted save keeps the previous checkpoint."""

import pytest
import torch

from livevlm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from livevlm.config import FormatConfig, ModelConfig
from livevlm.model import build_live_model
from livevlm.stream_format import register_placeholder


@pytest.fixture
def llm_folder(tmp_path, tiny_tokenizer, tiny_llm):
    folder = tmp_path / "base"
    tiny_llm.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("finetune", ["lora", "full", "connector"])
def test_save_then_load_gives_identical_logits(tmp_path, llm_folder, tiny_tokenizer, tiny_llm, finetune):
    config = ModelConfig(llm=str(llm_folder), finetune=finetune, lora_r=4, lora_alpha=8)
    placeholder = register_placeholder(tiny_tokenizer)
    model = build_live_model(config, tiny_llm, vision_dim=8, placeholder_id=placeholder)
    with torch.no_grad():  # make LoRA B non-zero so that an unloaded adapter would show
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.eval()
    ids = torch.tensor([[1, placeholder, 5, placeholder, 9]])
    frames = torch.randn(2, 8)
    expected = model(ids, frames)[0]
    save_checkpoint(model, tiny_tokenizer, config, FormatConfig(), tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.tokenizer.convert_tokens_to_ids("<v>") == placeholder
    assert torch.allclose(loaded.model(ids, frames)[0], expected, atol=1e-5)


def test_failed_save_leaves_previous_checkpoint(tmp_path, llm_folder, tiny_tokenizer, tiny_llm, monkeypatch):
    config = ModelConfig(llm=str(llm_folder), finetune="connector")
    model = build_live_model(config, tiny_llm, 8, register_placeholder(tiny_tokenizer))
    save_checkpoint(model, tiny_tokenizer, config, FormatConfig(), tmp_path / "ckpt")
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("livevlm.checkpoint.save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(model, tiny_tokenizer, config, FormatConfig(), tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt")] == []
    load_checkpoint(tmp_path / "ckpt")


def test_not_a_checkpoint_says_how_to_get_one(tmp_path):
    with pytest.raises(CheckpointError, match="livevlm.yaml is missing"):
        load_checkpoint(tmp_path)
