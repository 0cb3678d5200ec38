"""The feature cache: every video of a dialogue file encoded once into `[T, N, D]` frame tokens.

One safetensors file per (video, fps), named after the video's path relative to the dialogue file
(`videos/000.mp4` → `videos__000.mp4.safetensors`), holding `tokens` `[T, N, D]` (frames at 0, 1/fps, …)
and metadata (fps, encoder, frame size, grid, pooled token, mean_rgb, hue_bins). Files are written to a temporary name
and renamed when complete, so a killed run never leaves a file that reads as valid; a rerun skips finished
videos.

A cache of *used frames only* (`livevlm data encode --used-frames-only`) holds, per video, just the frames
some dialogue of the file covers (`[start_s, end_s)`), with their indices (`frame_index` `[K]`) and the video's
frame count: a data set of short clips cut from long videos costs the encoder only its clips' frames. Each
run of frames is encoded with the frame shown before it (`change_hues` compares the two), so its tokens are
the whole video's tokens at those frames. `load_clip` reads a clip from either kind of file.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterable, Iterator
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


class FramesNotCachedError(LookupError):
    """A used-frames-only cache lacks frames a dialogue asks for; the message says which and how to encode them."""


def load_features(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """→ (tokens `[T, N, D]` float32 of every frame of the video, metadata).

    Raises:
        FramesNotCachedError: the file holds only some frames (`--used-frames-only`); read it with `load_clip`.
    """
    with safe_open(str(path), framework="pt") as handle:
        if "frame_index" in handle.keys():
            raise FramesNotCachedError(f"{path} holds only the frames its dialogues use (`data encode "
                                       "--used-frames-only`), not the whole video; re-encode without it")
        return handle.get_tensor("tokens").float(), dict(handle.metadata() or {})


def load_clip(path: Path, first: int, count: int) -> tuple[torch.Tensor, dict[str, str]]:
    """→ (tokens `[≤count, N, D]` float32 of frames `first, first+1, …` up to the video's end, metadata), from a
    whole-video file or a used-frames-only one.

    Raises:
        FramesNotCachedError: a used-frames-only file lacks some of those frames.
    """
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tokens = handle.get_tensor("tokens")
        if "frame_index" not in handle.keys():
            return tokens[first:first + count].float(), metadata
        stored = {int(index): row for row, index in enumerate(handle.get_tensor("frame_index").tolist())}
    wanted = range(first, min(first + count, int(metadata["video_frames"])))
    missing = [index for index in wanted if index not in stored]
    if missing:
        raise FramesNotCachedError(f"{path} holds only the frames of the dialogues it was encoded for; frames "
                                   f"{missing[0]}…{missing[-1]} ({len(missing)}) are not among them: encode this "
                                   "dialogue file into its own cache (`livevlm data encode … --used-frames-only`), "
                                   "or the whole videos (without it)")
    return tokens[[stored[index] for index in wanted]].float(), metadata


def save_features(path: Path, tokens: torch.Tensor, metadata: dict[str, str],
                  frame_index: torch.Tensor | None = None) -> None:
    """Atomic write: a temporary file renamed into place only once complete. With `frame_index` `[K]`, a
    used-frames-only file: `tokens` `[K, N, D]` are those frames' (and metadata holds `video_frames`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"tokens": tokens.contiguous()}
    if frame_index is not None:
        tensors["frame_index"] = frame_index.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _stream_video(path: Path, fps: float, size: int, resample: str = "bilinear") -> Iterator[np.ndarray]:
    """The frames of one video at `fps`, letterboxed to `size` with the encoder's filter, one at a time."""
    from livevlm.video import read_frames

    return (frame for _, frame in read_frames(path, fps=fps, size=size, resample=resample))  # type: ignore[arg-type]


def _decode_video(job: tuple[Path, float, int, str]) -> np.ndarray:
    """All frames of one video at once: `[T, size, size, 3]` uint8 (a worker's job)."""
    frames = list(_stream_video(*job))
    return np.stack(frames) if frames else np.zeros((0, job[2], job[2], 3), np.uint8)


def clip_frames(dialogue: Dialogue, fps: float) -> range:
    """The indices of the video frames, at `fps`, that `dialogue` covers: from its `start_s` on, `num_frames()` of
    them. What the dataset reads from the cache, and what `--used-frames-only` encodes."""
    first = round(dialogue.start_s * fps)
    return range(first, first + dialogue.num_frames())


def _holds(path: Path, used: set[int] | None) -> bool:
    """Whether a finished cache file serves these frames (None = the whole video, which only a whole file does)."""
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as handle:
        if "frame_index" not in handle.keys():
            return True
        if used is None:
            return False
        stored = set(handle.get_tensor("frame_index").tolist())
        video_frames = int((handle.metadata() or {})["video_frames"])
    return {index for index in used if index < video_frames} <= stored


def _encode_used(frames: Iterable[np.ndarray], used: set[int], encoder,
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Encode only the frames whose index is in `used`, each run of them with the frame shown before it.

    → (tokens `[K, N, D]`, their frame indices `[K]`, the video's frame count). Holds at most one batch of
    pixels: a run is encoded `batch_size` frames at a time, each batch given the frame before it."""
    outputs: list[torch.Tensor] = []
    indices: list[int] = []
    pending: list[np.ndarray] = []
    before = last = None
    count = 0
    for index, frame in enumerate(frames):
        count += 1
        if index in used:
            if not pending:
                before = last  # the frame shown before this batch (None: the video's first frame)
            pending.append(frame)
            indices.append(index)
        if pending and (index not in used or len(pending) == batch_size):
            outputs.append(encoder.encode(pending, batch_size, previous=before))
            pending = []
        last = frame
    if pending:
        outputs.append(encoder.encode(pending, batch_size, previous=before))
    tokens = torch.cat(outputs) if outputs else torch.zeros(0, encoder.tokens_per_frame, encoder.feature_width)
    return tokens, torch.tensor(indices, dtype=torch.long), count


def encode_dialogue_videos(dialogues_path: str | Path, encoder, out_dir: str | Path, fps: float | None = None,
                           batch_size: int = 16, encoder_name: str = "", workers: int = 1,
                           used_frames_only: bool = False) -> list[Path]:
    """Encode every distinct video of a dialogue file into the cache (skipping finished ones).

    With `workers` > 1, that many processes decode the next videos while this one encodes; the files
    are the same as with one. At most 2 × `workers` decoded videos wait in memory at a time, so keep one
    worker for hour-long videos (it streams frames in batches).

    used_frames_only: encode only the frames some dialogue covers (every video is still decoded whole: the
        encoder, not the decoder, is the cost). A file is skipped when it already holds them all.

    Returns the cache files, one per distinct video. Raises `VideoError` naming a missing/broken video.
    """
    from tqdm import tqdm

    if workers < 1:
        raise ValueError(f"encode: workers={workers} is invalid; use 1 or more processes")
    dialogues_path = Path(dialogues_path)
    root = dialogues_path.parent
    out_dir = Path(out_dir)
    videos: dict[str, float] = {}
    used: dict[str, set[int]] = {}
    for d in read_dialogues(dialogues_path):
        if d.video is not None:
            rate = videos.setdefault(d.video, fps or d.fps)
            used.setdefault(d.video, set()).update(clip_frames(d, rate))
    entries = [(video, rate, out_dir / feature_name(video)) for video, rate in sorted(videos.items())]
    files = [target for _, _, target in entries]
    todo = [(video, rate, target) for video, rate, target in entries
            if not _holds(target, used[video] if used_frames_only else None)]
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
                metadata = {"fps": str(rate), "video": video, "encoder": encoder_name,
                            "frame_size": str(encoder.image_size), "grid": str(encoder.grid),
                            "pooled_token": str(encoder.pooled_token), "mean_rgb": str(encoder.mean_rgb),
                            "hue_bins": str(encoder.hue_bins), "change_hues": str(encoder.change_hues)}
                if used_frames_only:
                    tokens, frame_index, video_frames = _encode_used(frames, used[video], encoder, batch_size)
                    save_features(target, tokens, {**metadata, "video_frames": str(video_frames)}, frame_index)
                else:
                    tokens = encoder.encode(frames, batch_size)  # [T, N, D] on CPU, streamed batch by batch
                    save_features(target, tokens, metadata)
                progress.update()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        progress.close()
    return files
