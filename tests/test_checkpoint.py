"""Checkpoints: save → load gives the same outputs; an interrupted save keeps the previous checkpoint."""

import pytest
import torch

from conftest import build_tiny_llm
from livevlm.checkpoint import CheckpointError, load_checkpoint, load_trained_weights, save_checkpoint
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


def test_a_trained_connector_norm_scale_survives_save_and_load(tmp_path, llm_folder, tiny_tokenizer, tiny_llm):
    config = ModelConfig(llm=str(llm_folder), finetune="connector", connector_norm=True)
    model = build_live_model(config, tiny_llm, 8, register_placeholder(tiny_tokenizer))
    with torch.no_grad():  # as if trained: no longer the embedding RMS the norm starts at
        model.connector.norm.weight.copy_(torch.linspace(0.5, 2.0, model.connector.norm.weight.numel()))
    save_checkpoint(model, tiny_tokenizer, config, FormatConfig(), tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.model_config.connector_norm
    assert torch.equal(loaded.model.connector.norm.weight, model.connector.norm.weight)


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


def test_a_checkpoint_config_with_a_key_twice_is_refused(tmp_path):
    (tmp_path / "livevlm.yaml").write_text("model:\n  grid: 3\nmodel:\n  grid: 2\n")
    with pytest.raises(CheckpointError, match=r"line 3: key 'model' is given twice"):
        load_checkpoint(tmp_path)


def test_merging_a_lora_on_a_tied_lm_head_keeps_the_input_embeddings(tmp_path, tiny_tokenizer):
    """SmolLM2 ties lm_head to the embeddings: a merged lm_head LoRA must not leak into the inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=True)).eval()
    assert llm.lm_head.weight is llm.get_input_embeddings().weight
    llm.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    config = ModelConfig(llm=str(tmp_path / "base"), lora_r=4, lora_alpha=8, lora_targets=["q_proj", "lm_head"])
    placeholder = register_placeholder(tiny_tokenizer)
    model = build_live_model(config, llm, vision_dim=8, placeholder_id=placeholder)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.eval()
    ids = torch.tensor([[1, placeholder, 5, 9, 12]])
    frames = torch.randn(1, 8)
    expected = model(ids, frames)[0]
    save_checkpoint(model, tiny_tokenizer, config, FormatConfig(), tmp_path / "ckpt")
    merged = load_checkpoint(tmp_path / "ckpt", merge_lora=True)
    assert torch.allclose(merged.model(ids, frames)[0], expected, atol=1e-5)


@pytest.mark.parametrize(("finetune", "hue_bins"), [("connector", 0), ("lora", 0), ("lora", 4)])
def test_init_from_a_checkpoint_without_colour_or_changes_starts_as_it(tmp_path, llm_folder, tiny_tokenizer, finetune,
                                                                       hue_bins):
    """`train.init_from` into a model with mean_rgb (and hue_bins) and frame_delta: the new inputs' connector
    columns start at zero (`LiveModel.load_connector`), so the model gives the checkpoint's outputs on zero
    colours."""
    config = ModelConfig(llm=str(llm_folder), finetune=finetune, lora_r=4, lora_alpha=8)
    placeholder = register_placeholder(tiny_tokenizer)
    saved = build_live_model(config, build_tiny_llm(len(tiny_tokenizer) - 1), 8, placeholder)
    with torch.no_grad():
        for name, param in saved.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    save_checkpoint(saved, tiny_tokenizer, config, FormatConfig(), tmp_path / "ckpt")
    wider = ModelConfig(llm=str(llm_folder), finetune=finetune, lora_r=4, lora_alpha=8, mean_rgb=True,
                        hue_bins=hue_bins, frame_delta=True)
    model = build_live_model(wider, build_tiny_llm(len(tiny_tokenizer) - 1), 2 * (8 + 3 + hue_bins), placeholder)
    load_trained_weights(model, tmp_path / "ckpt", wider)
    tokens = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(0))  # [T, N, D]
    coloured = torch.cat([tokens, torch.zeros(3, 2, 3 + hue_bins)], dim=-1)  # zero colours; the model derives changes
    ids = torch.tensor([[1, placeholder, placeholder, 5, placeholder, placeholder, 9, placeholder, placeholder]])
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids, coloured)[0], saved.eval()(ids, tokens)[0], atol=1e-5, rtol=0)


def test_init_from_a_hue_checkpoint_into_a_change_hues_model_starts_as_it(tmp_path, llm_folder, tiny_tokenizer):
    """`model.change_hues` added to a checkpoint with hues and frame changes: its columns (and their changes')
    start at zero, so the model gives the checkpoint's outputs whatever the changed pixels' hues are."""
    config = ModelConfig(llm=str(llm_folder), finetune="connector", mean_rgb=True, hue_bins=4, frame_delta=True)
    placeholder = register_placeholder(tiny_tokenizer)
    saved = build_live_model(config, build_tiny_llm(len(tiny_tokenizer) - 1), 2 * (8 + 3 + 4), placeholder)
    save_checkpoint(saved, tiny_tokenizer, config, FormatConfig(), tmp_path / "ckpt")
    wider = ModelConfig(llm=str(llm_folder), finetune="connector", mean_rgb=True, hue_bins=4, change_hues=True,
                        frame_delta=True)
    model = build_live_model(wider, build_tiny_llm(len(tiny_tokenizer) - 1), 2 * (8 + 3 + 4 + 4), placeholder)
    load_trained_weights(model, tmp_path / "ckpt", wider)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 2, 8 + 3 + 4, generator=generator)  # [T, N, D]
    changed = torch.cat([tokens, torch.rand(3, 2, 4, generator=generator) * 10], dim=-1)  # any changed hues
    ids = torch.tensor([[1, placeholder, placeholder, 5, placeholder, placeholder, 9, placeholder, placeholder]])
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids, changed)[0], saved.eval()(ids, tokens)[0], atol=1e-5, rtol=0)


def test_init_from_a_change_hues_checkpoint_into_a_model_without_them_is_refused(tmp_path, llm_folder,
                                                                                tiny_tokenizer):
    config = ModelConfig(llm=str(llm_folder), finetune="connector", hue_bins=4, change_hues=True)
    placeholder = register_placeholder(tiny_tokenizer)
    save_checkpoint(build_live_model(config, build_tiny_llm(len(tiny_tokenizer) - 1), 8 + 8, placeholder),
                    tiny_tokenizer, config, FormatConfig(), tmp_path / "ckpt")
    other = ModelConfig(llm=str(llm_folder), finetune="connector", hue_bins=4)
    model = build_live_model(other, build_tiny_llm(len(tiny_tokenizer) - 1), 8 + 4, placeholder)
    with pytest.raises(CheckpointError, match="model.change_hues: True in the checkpoint, False here"):
        load_trained_weights(model, tmp_path / "ckpt", other)


def test_init_from_a_connector_of_another_width_names_both_and_the_fix(tmp_path, llm_folder, tiny_tokenizer):
    config = ModelConfig(llm=str(llm_folder), finetune="connector")
    placeholder = register_placeholder(tiny_tokenizer)
    save_checkpoint(build_live_model(config, build_tiny_llm(len(tiny_tokenizer) - 1), 8, placeholder), tiny_tokenizer,
                    config, FormatConfig(), tmp_path / "ckpt")
    model = build_live_model(config, build_tiny_llm(len(tiny_tokenizer) - 1), 10, placeholder)
    with pytest.raises(CheckpointError, match=r"train.init_from=.*ckpt: its connector takes 8-wide frame tokens, "
                                              r"this model's takes 10 \(from the feature cache\); encode the features"):
        load_trained_weights(model, tmp_path / "ckpt", config)


def test_init_from_a_checkpoint_with_other_hue_bins_is_refused(tmp_path, llm_folder, tiny_tokenizer):
    config = ModelConfig(llm=str(llm_folder), finetune="connector", mean_rgb=True, hue_bins=12)
    placeholder = register_placeholder(tiny_tokenizer)
    save_checkpoint(build_live_model(config, build_tiny_llm(len(tiny_tokenizer) - 1), 8 + 3 + 12, placeholder),
                    tiny_tokenizer, config, FormatConfig(), tmp_path / "ckpt")
    other = ModelConfig(llm=str(llm_folder), finetune="connector", mean_rgb=True, hue_bins=6)
    model = build_live_model(other, build_tiny_llm(len(tiny_tokenizer) - 1), 8 + 3 + 6, placeholder)
    with pytest.raises(CheckpointError, match="model.hue_bins: 12 in the checkpoint, 6 here"):
        load_trained_weights(model, tmp_path / "ckpt", other)
