"""The packaged backbones end to end: DINOv2-small frames → connector → SmolLM2 + LoRA, trained 20 steps."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from livevlm.config import FormatConfig, ModelConfig
from livevlm.model import build_live_model
from livevlm.stream_format import Frames, Message, StreamFormat
from livevlm.vision import load_frame_encoder


def coloured_frames(count: int, size: int = 224) -> np.ndarray:
    """A red square sliding to the right over grey: simple frames with real content."""
    frames = np.full((count, size, size, 3), 60, dtype=np.uint8)
    for i in range(count):
        x = 20 + 30 * i
        frames[i, 80:140, x:x + 60] = (225, 35, 35)
    return frames


@pytest.mark.slow  # ~50 s on 2 idle cores: 20 forward/backward passes of a 135M model
def test_one_training_step_on_packaged_backbones_and_loss_drops(dinov2_dir, smollm2_dir, smollm2_tokenizer):
    torch.manual_seed(0)
    encoder = load_frame_encoder(dinov2_dir, image_size=224, pooled_token=True, grid=3)
    frame_tokens = encoder.encode(coloured_frames(4))  # [4, 10, 384]
    assert frame_tokens.shape == (4, 10, 384)

    llm = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    config = ModelConfig(lora_r=8, lora_alpha=16, lora_dropout=0.0)
    fmt = StreamFormat(smollm2_tokenizer, FormatConfig(), config.tokens_per_frame)
    model = build_live_model(config, llm, vision_dim=384, placeholder_id=fmt.placeholder_id)
    rendered = fmt.render([Frames(1), Message("user", "Please narrate the video."), Message("assistant", "Sure."),
                           Frames(3), Message("assistant", "The red square moves to the right.")])
    ids = torch.tensor([rendered.input_ids])
    labels = torch.tensor([rendered.labels])
    frame_target = torch.tensor([rendered.frame_target])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    model.train()
    for _ in range(20):
        _, loss, _ = model(ids, frame_tokens, labels=labels, frame_target=frame_target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
