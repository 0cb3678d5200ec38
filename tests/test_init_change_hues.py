"""`scripts/init_change_hues.py`, a step of the default model's build: the widened connector reads the changed
pixels' hues through the hue columns' weights."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent.parent / "scripts" / "init_change_hues.py"


@pytest.fixture(scope="module")
def hue_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny model with 3 hue bins and frame_delta (a token's columns, then its change's), trained weights
    standing in as random ones."""
    from conftest import save_tiny_llm
    from livevlm.checkpoint import save_checkpoint
    from livevlm.config import FormatConfig, ModelConfig
    from livevlm.model import build_live_model

    root = tmp_path_factory.mktemp("hues")
    tokenizer, placeholder, llm = save_tiny_llm(root / "llm")
    config = ModelConfig(llm=str(root / "llm"), vision=str(tiny_checkpoint[0].parent / "vision"), frame_size=32,
                         grid=2, mean_rgb=True, hue_bins=3, frame_delta=True, finetune="connector")
    torch.manual_seed(0)
    # the connector takes a token's 22 columns and its change's 22
    model = build_live_model(config, llm, vision_dim=2 * (16 + 3 + 3), placeholder_id=placeholder)
    save_checkpoint(model, tokenizer, config, FormatConfig(), root / "ckpt")
    return root / "ckpt"


def test_changed_hues_enter_through_the_hue_columns(hue_checkpoint, tmp_path):
    """fc1 is linear in its inputs, so with the new columns a copy of the hue columns, a token [x, h, c] (and
    its change [dx, dh, dc]) gives what the old connector gives [x, h + c] ([dx, dh + dc])."""
    out = tmp_path / "widened"
    subprocess.run([sys.executable, str(SCRIPT), str(hue_checkpoint), str(out)], check=True, capture_output=True)
    old = load_file(str(hue_checkpoint / "connector.safetensors"))["fc1.weight"]  # [H, 2·22]
    new = load_file(str(out / "connector.safetensors"))["fc1.weight"]  # [H, 2·25]
    assert old.shape[1] == 2 * 22 and new.shape[1] == 2 * 25
    torch.manual_seed(1)
    x, h, c = torch.randn(2, 19), torch.randn(2, 3), torch.randn(2, 3)  # [token, change] × (features + rgb, hues, new)
    widened = torch.cat([x[0], h[0], c[0], x[1], h[1], c[1]])
    summed = torch.cat([x[0], h[0] + c[0], x[1], h[1] + c[1]])
    torch.testing.assert_close(new @ widened, old @ summed)
    assert yaml.safe_load((out / "livevlm.yaml").read_text())["model"]["change_hues"] is True


def test_a_model_without_hues_is_refused(tiny_checkpoint, tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tiny_checkpoint[0]), str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "needs hue_bins and no change_hues" in result.stderr
