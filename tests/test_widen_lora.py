"""`scripts/widen_lora.py`: a checkpoint's LoRA widened to a higher rank gives the same model, and a training
run at the new rank can start from it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent.parent / "scripts" / "widen_lora.py"


@pytest.fixture(scope="module")
def lora_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny model with a rank-2 LoRA whose B is random (a fresh adapter's B is zero, which would hide a
    wrong widening)."""
    from conftest import save_tiny_llm
    from livevlm.checkpoint import save_checkpoint
    from livevlm.config import FormatConfig, ModelConfig
    from livevlm.model import build_live_model

    root = tmp_path_factory.mktemp("lora")
    tokenizer, placeholder, llm = save_tiny_llm(root / "llm")
    config = ModelConfig(llm=str(root / "llm"), vision=str(tiny_checkpoint[0].parent / "vision"), frame_size=32,
                         grid=2, finetune="lora", lora_r=2, lora_alpha=4, lora_targets=["q_proj", "v_proj"])
    torch.manual_seed(0)
    model = build_live_model(config, llm, vision_dim=16, placeholder_id=placeholder)
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    save_checkpoint(model, tokenizer, config, FormatConfig(), root / "ckpt")
    return root / "ckpt"


def logits(folder: Path) -> torch.Tensor:
    from livevlm.checkpoint import load_checkpoint

    loaded = load_checkpoint(folder)
    ids = torch.arange(1, 20)[None]  # [1, 19]
    with torch.no_grad():
        return loaded.model(ids)[0]


def test_the_widened_model_gives_the_same_logits(lora_checkpoint, tmp_path):
    out = tmp_path / "wide"
    subprocess.run([sys.executable, str(SCRIPT), str(lora_checkpoint), str(out), "--rank", "6"], check=True,
                   capture_output=True)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    a_keys = [key for key in adapter if ".lora_A." in key]
    assert a_keys and all(adapter[key].shape[0] == 6 for key in a_keys)
    assert all(adapter[key.replace(".lora_A.", ".lora_B.")].shape[1] == 6 for key in a_keys)
    model = yaml.safe_load((out / "livevlm.yaml").read_text())["model"]
    assert (model["lora_r"], model["lora_alpha"]) == (6, 12)  # alpha / r stays 2
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 6
    torch.testing.assert_close(logits(out), logits(lora_checkpoint), rtol=0, atol=1e-5)


def test_a_training_run_at_the_new_rank_starts_from_it(lora_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from livevlm.checkpoint import load_trained_weights, read_checkpoint_config
    from livevlm.model import build_live_model

    out = tmp_path / "wide"
    subprocess.run([sys.executable, str(SCRIPT), str(lora_checkpoint), str(out), "--rank", "4"], check=True,
                   capture_output=True)
    config, _ = read_checkpoint_config(out)
    llm = AutoModelForCausalLM.from_pretrained(config.llm)
    model = build_live_model(config, llm, vision_dim=16, placeholder_id=0)
    load_trained_weights(model, out, config)  # raises on any weight of the wrong shape or a missing one
    ranks = {param.shape[0] for name, param in model.llm.named_parameters() if "lora_A" in name}
    assert ranks == {4}


def test_a_lower_rank_is_refused(lora_checkpoint, tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(lora_checkpoint), str(tmp_path / "out"), "--rank", "2"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "must be above the checkpoint's lora_r 2" in result.stderr
