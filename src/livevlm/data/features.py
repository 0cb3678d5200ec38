"""The feature cache: every video of a dialogue file encoded once into `[T, N, D]` frame tokens.

One safetensors file per (video, fps), named after the video's path relative to the dialogue file
(`videos/000.mp4` → `videos__000.mp4.safetensors`), holding `tokens` `[T, N, D]` (frames at 0, 1/fps, …)
and metadata (fps, encoder, frame size, grid, pooled token, mean_rgb, hue_bins). Files are written to a temporary name
and renamed when complete, so a killed run never leaves a file that reads as valid; a rerun skips finished
videos.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from livevlm.data.schema import Dialogue, read_dialogues
from livevlm.files import atomic_path

log = logging.getLogger(__name__)


def feature_name(video: str) -> str:
    """Cache file name of a video path (relative to the dialogue file)."""
    return video.replace("\\", "/").lstrip("./").replace("/", "__") + ".safetensors"


def feature_file(dialogue: Dialogue, root: Path, cache_dir: Path | None) -> Path | None:
    """Where the features of `dialogue` live: its own `features` field, else the cache entry of its video."""
    if dialogue.features is not None:
        return root / dialogue.features
    if cache_dir is None or dialogue.video is None:
        return None
    return cache_dir / feature_name(dialogue.video)


def load_features(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """→ (tokens `[T, N, D]` float32, metadata)."""
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor("tokens").float(), dict(handle.metadata() or {})


def save_features(path: Path, tokens: torch.Tensor, metadata: dict[str, str]) -> None:
    """Atomic write: a temporary file renamed into place only once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"tokens": tokens.contiguous()}, str(tmp), metadata=metadata)


def _stream_video(path: Path, fps: float, size: int, resample: str = "bilinear") -> Iterator[np.ndarray]:
    """The frames of one video at `fps`, letterboxed to `size` with the encoder's filter, one at a time."""
    from livevlm.video import read_frames

    return (frame for _, frame in read_frames(path, fps=fps, size=size, resample=resample))  # type: ignore[arg-type]


def _decode_video(job: tuple[Path, float, int, str]) -> np.ndarray:
    """All frames of one video at once: `[T, size, size, 3]` uint8 (a worker's job)."""
    frames = list(_stream_video(*job))
    return np.stack(frames) if frames else np.zeros((0, job[2], job[2], 3), np.uint8)


def encode_dialogue_videos(dialogues_path: str | Path, encoder, out_dir: str | Path, fps: float | None = None,
                           batch_size: int = 16, encoder_name: str = "", workers: int = 1) -> list[Path]:
    """Encode every distinct video of a dialogue file into the cache (skipping finished ones).

    With `workers` > 1, that many processes decode the next videos while this one encodes; the files
    are the same as with one. At most 2 × `workers` decoded videos wait in memory at a time, so keep one
    worker for hour-long videos (it streams frames in batches).

    Returns the cache files, one per distinct video. Raises `VideoError` naming a missing/broken video.
    """
    from tqdm import tqdm

    if workers < 1:
        raise ValueError(f"encode: workers={workers} is invalid; use 1 or more processes")
    dialogues_path = Path(dialogues_path)
    root = dialogues_path.parent
    out_dir = Path(out_dir)
    videos: dict[str, float] = {}
    for d in read_dialogues(dialogues_path):
        if d.video is not None:
            videos.setdefault(d.video, fps or d.fps)
    entries = [(video, rate, out_dir / feature_name(video)) for video, rate in sorted(videos.items())]
    files = [target for _, _, target in entries]
    todo = [entry for entry in entries if not entry[2].is_file()]
    jobs = [(root / video, rate, encoder.image_size, encoder.resample) for video, rate, _ in todo]
    progress = tqdm(total=len(files), initial=len(files) - len(todo), desc="encode videos", unit="video")
    pool = None
    if workers > 1 and len(todo) > 1:
        pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn"))
    try:
        window = 2 * workers
        for start in range(0, len(todo), window):  # a window at a time bounds the decoded frames held
            chunk = jobs[start:start + window]
            # one process streams a video's frames batch by batch (constant memory for any length);
            # workers hand over whole decoded videos
            decoded = pool.map(_decode_video, chunk) if pool else (_stream_video(*job) for job in chunk)
            for (video, rate, target), frames in zip(todo[start:start + window], decoded, strict=True):
                tokens = encoder.encode(frames, batch_size)  # [T, N, D] on CPU, streamed batch by batch
                save_features(target, tokens, {"fps": str(rate), "video": video, "encoder": encoder_name,
                                               "frame_size": str(encoder.image_size), "grid": str(encoder.grid),
                                               "pooled_token": str(encoder.pooled_token),
                                               "mean_rgb": str(encoder.mean_rgb),
                                               "hue_bins": str(encoder.hue_bins),
                                               "change_hues": str(encoder.change_hues)})
                progress.update()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        progress.close()
    return files
