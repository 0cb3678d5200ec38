"""Frame encoders on tiny random SigLIP / CLIP / DINOv2 towers: shapes, token semantics, loading, errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from livevlm.vision import HUE_GAIN, RGB_GAIN, VisionError, build_frame_encoder, load_frame_encoder

SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=4)


def tiny_tower(kind: str, image_size: int = 24):
    torch.manual_seed(0)
    if kind == "siglip":
        return SiglipVisionModel(SiglipVisionConfig(image_size=image_size, **SMALL)).eval()
    if kind == "clip":
        return CLIPVisionModel(CLIPVisionConfig(image_size=image_size, **SMALL)).eval()
    return Dinov2Model(Dinov2Config(image_size=image_size, **SMALL)).eval()


@pytest.mark.parametrize("kind", ["siglip", "clip", "dinov2"])
def test_tokens_are_pooled_then_grid(kind):
    tower = tiny_tower(kind)
    encoder = build_frame_encoder(tower, image_size=24, pooled_token=True, grid=3)
    pixels = torch.randn(2, 3, 24, 24)
    tokens = encoder(pixels)
    assert tokens.shape == (2, 10, 16)
    out = tower(pixel_values=pixels)
    assert torch.allclose(tokens[:, 0], out.pooler_output, atol=1e-6)
    patches = out.last_hidden_state if kind == "siglip" else out.last_hidden_state[:, 1:]  # [2, 36, 16]
    grid = patches.reshape(2, 6, 6, 16)
    top_left = grid[:, :2, :2].mean(dim=(1, 2))  # 6x6 -> 3x3: each cell averages a 2x2 block
    assert torch.allclose(tokens[:, 1], top_left, atol=1e-6)
    assert torch.allclose(tokens[:, 1:], F.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2), 3).flatten(2).transpose(1, 2),
                          atol=1e-6)


@pytest.mark.parametrize("kind", ["siglip", "dinov2"])
def test_mean_rgb_appends_each_tokens_pixel_colour(kind):
    encoder = build_frame_encoder(tiny_tower(kind), image_size=24, pooled_token=True, grid=3, mean_rgb=True)
    pixels = torch.zeros(1, 3, 24, 24)
    pixels[0, :, :8, :8] = torch.tensor([1.0, 2.0, 3.0])[:, None, None]  # the top-left cell (6x6 patches -> 3x3)
    tokens = encoder(pixels)
    assert tokens.shape == (1, 10, 16 + 3) and encoder.feature_width == 19
    assert torch.allclose(tokens[..., :16], build_frame_encoder(encoder.tower, 24)(pixels), atol=1e-6)
    colours = tokens[0, :, 16:] / RGB_GAIN  # [10, 3]
    assert torch.allclose(colours[0], torch.tensor([1.0, 2.0, 3.0]) / 9)  # the frame: 1 cell of 9
    assert torch.allclose(colours[1], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(colours[2:], torch.zeros(8, 3))


def test_hue_bins_put_each_hue_on_its_own_channel_weighted_by_chroma():
    """12 bins, 30° apart, bin 0 centred on red. Pure red (chroma 1) fills bin 0; hue 15° ((1, 0.25, 0): half-way
    between red and orange) splits evenly between bins 0 and 1; grey (chroma 0) adds nothing."""
    encoder = build_frame_encoder(tiny_tower("dinov2"), image_size=24, pooled_token=True, grid=3, mean_rgb=True,
                                  hue_bins=12)
    rgb = torch.full((1, 3, 24, 24), 0.5)  # grey everywhere
    rgb[0, :, :8, :8] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # the top-left cell: red
    rgb[0, :, :8, 8:16] = torch.tensor([1.0, 0.25, 0.0])[:, None, None]  # the top-middle cell: hue 15°
    pixels = (rgb - encoder.mean) / encoder.std
    tokens = encoder(pixels)
    assert tokens.shape == (1, 10, 16 + 3 + 12) and encoder.feature_width == 31
    assert torch.allclose(tokens[..., :19], build_frame_encoder(encoder.tower, 24, mean_rgb=True)(pixels), atol=1e-6)
    hues = tokens[0, :, 19:] / HUE_GAIN  # [10, 12]
    expected = torch.zeros(10, 12)
    expected[1, 0] = 1.0
    expected[2, :2] = 0.5
    expected[0] = (expected[1] + expected[2]) / 9  # the frame: 2 cells of 9
    assert torch.allclose(hues, expected, atol=1e-5)


def test_change_hues_count_the_changed_pixels_hues_in_both_frames():
    """A red block appears in the top-left cell, then turns green (hue 120°: bin 4 of 12). Frame 1's changed
    pixels are the block (red now, grey before: bin 0 only); frame 2's are the block again (green now, red
    before: bins 0 and 4); the first frame has no frame before, so no change; the grey never counts."""
    encoder = build_frame_encoder(tiny_tower("dinov2"), image_size=24, pooled_token=True, grid=3, hue_bins=12,
                                  change_hues=True)
    rgb = torch.full((3, 3, 24, 24), 0.5)  # grey everywhere
    rgb[1, :, :8, :8] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # frame 1: a red block fills the cell
    rgb[2, :, :8, :8] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]  # frame 2: it is green
    pixels = (rgb - encoder.mean) / encoder.std
    tokens = encoder(pixels)
    assert tokens.shape == (3, 10, 16 + 12 + 12) and encoder.feature_width == 40
    assert torch.allclose(tokens[..., :28], build_frame_encoder(encoder.tower, 24, hue_bins=12)(pixels), atol=1e-6)
    changes = tokens[..., 28:] / HUE_GAIN  # [3, 10, 12]
    expected = torch.zeros(3, 10, 12)
    expected[1, 1, 0] = 1.0  # the top-left cell: all its pixels changed, red in frame 1
    expected[2, 1, 0] = expected[2, 1, 4] = 1.0  # red before, green now
    expected[:, 0] = expected[:, 1] / 9  # the frame: 1 cell of 9
    assert torch.allclose(changes, expected, atol=1e-5)


def test_change_hues_compare_the_first_frame_with_the_previous_one_given():
    """A stream encoded in several calls gives the tokens of one call when each passes the frame before."""
    encoder = build_frame_encoder(tiny_tower("dinov2"), image_size=24, hue_bins=6, change_hues=True)
    frames = np.random.default_rng(0).integers(0, 255, (5, 24, 24, 3), dtype=np.uint8)
    whole = encoder.encode(frames)
    parts = torch.cat([encoder.encode(frames[:2]), encoder.encode(frames[2:], previous=frames[1])])
    assert torch.allclose(parts, whole, atol=1e-6)
    assert torch.allclose(encoder.encode(frames, batch_size=2), whole, atol=1e-6)
    assert not torch.allclose(encoder.encode(frames[2:]), whole[2:], atol=1e-3)  # without it: no change at frame 2


def test_change_hues_without_hue_bins_are_refused():
    with pytest.raises(VisionError, match="change_hues needs hue_bins"):
        build_frame_encoder(tiny_tower("dinov2"), image_size=24, change_hues=True)


def test_hue_bins_of_one_or_two_are_refused():
    with pytest.raises(VisionError, match="hue_bins=2: use 0"):
        build_frame_encoder(tiny_tower("dinov2"), image_size=24, hue_bins=2)


def test_grid_only_and_pooled_only_counts():
    tower = tiny_tower("dinov2")
    assert build_frame_encoder(tower, 24, pooled_token=False, grid=2)(torch.randn(1, 3, 24, 24)).shape == (1, 4, 16)
    assert build_frame_encoder(tower, 24, pooled_token=True, grid=0)(torch.randn(1, 3, 24, 24)).shape == (1, 1, 16)


def test_encoder_is_frozen():
    encoder = build_frame_encoder(tiny_tower("siglip"), 24)
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.tower.training


def test_preprocess_letterboxes_and_normalises_with_processor_stats(tmp_path):
    tower = tiny_tower("dinov2")
    tower.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5],
                                                                    "image_std": [0.25, 0.25, 0.25]}))
    encoder = load_frame_encoder(tmp_path, image_size=24, grid=2)
    white_wide = np.full((12, 24, 3), 255, dtype=np.uint8)  # 2:1 -> 6 black rows above and below
    pixels = encoder.preprocess([white_wide])
    assert pixels.shape == (1, 3, 24, 24)
    assert torch.allclose(pixels[0, :, 0], torch.full((3, 24), (0 - 0.5) / 0.25))  # padding is black
    assert torch.allclose(pixels[0, :, 12], torch.full((3, 24), (1 - 0.5) / 0.25))  # the image is white


def test_encode_batches_give_the_same_tokens():
    encoder = build_frame_encoder(tiny_tower("clip"), 24)
    frames = np.random.default_rng(0).integers(0, 255, (5, 24, 24, 3), dtype=np.uint8)
    assert torch.allclose(encoder.encode(frames, batch_size=2), encoder.encode(frames, batch_size=5), atol=1e-5)


def test_missing_vision_path_names_it(tmp_path):
    with pytest.raises(VisionError, match="does not exist"):
        load_frame_encoder(tmp_path / "nope")


def test_unsupported_tower_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(VisionError, match="not supported"):
        load_frame_encoder(tmp_path)
