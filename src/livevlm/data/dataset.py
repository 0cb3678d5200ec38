"""Training batches: dialogue JSONL + frame tokens → input ids, labels and frame tokens, padded.

Frame tokens come from the feature cache (fast; `livevlm data encode`) or, without a cache, from a frame
encoder run on the video when an item is read (slow; for small jobs). Streams longer than `max_frames`
are truncated there; turns after the cut are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from livevlm.data.features import clip_frames, feature_file, load_clip
from livevlm.data.schema import Dialogue, read_dialogues
from livevlm.stream_format import IGNORE, StreamFormat, timeline_to_items


class MissingFeaturesError(FileNotFoundError):
    """Some dialogues have no cached features; the message lists the videos and the command that fixes it."""


@dataclass
class StreamSample:
    input_ids: torch.Tensor  # [L]
    labels: torch.Tensor  # [L]
    frame_target: torch.Tensor  # [L] bool
    frame_tokens: torch.Tensor  # [T, N, D] raw: the model derives its other inputs (LiveModel.frame_inputs)
    id: str
    frame_ends: list[int]  # position of every frame's last token (labelled or not)
    key_target: torch.Tensor | None = None  # [L] bool: the frame targets of the dialogue's key frames


class StreamDataset(Dataset):
    """Dialogues rendered in the stream layout, with their frame tokens.

    Args:
        dialogues_path: dialogue JSONL.
        fmt: the stream format (tokenizer + layout).
        cache_dir: feature cache folder (from `livevlm data encode`); None = encode on the fly.
        encoder: a `FrameEncoder`, needed when there is no cache.
        max_frames: truncate streams to this many frames.

    Raises:
        MissingFeaturesError: listing the videos missing from the cache.
    """

    def __init__(self, dialogues_path: str | Path, fmt: StreamFormat, cache_dir: str | Path | None = None,
                 encoder=None, max_frames: int = 256) -> None:
        self.path = Path(dialogues_path)
        self.root = self.path.parent
        self.dialogues: list[Dialogue] = read_dialogues(self.path)
        self.fmt = fmt
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.encoder = encoder
        self.max_frames = max_frames
        if encoder is None:
            self._check_cache()

    def _check_cache(self) -> None:
        missing = sorted({str(d.video or d.features) for d in self.dialogues
                          if (f := feature_file(d, self.root, self.cache_dir)) is None or not f.is_file()})
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise MissingFeaturesError(
                f"{self.path}: {len(missing)} video(s) have no features in {self.cache_dir}: {shown}; run "
                f"`livevlm data encode {self.path} --out {self.cache_dir}` (or pass a frame encoder)")

    def __len__(self) -> int:
        return len(self.dialogues)

    def frame_tokens(self, dialogue: Dialogue) -> torch.Tensor:
        """The stream's raw frame tokens `[T, N, D]`, clipped to [start_s, end_s) and `max_frames`; the stream
        starts at the dialogue's first frame (for `model.frame_delta`, its change is zero, as the engine sees it)."""
        file = feature_file(dialogue, self.root, self.cache_dir)
        if file is not None and file.is_file():
            frames = clip_frames(dialogue, dialogue.fps)
            tokens, meta = load_clip(file, frames.start, min(len(frames), self.max_frames))
            rate = float(meta.get("fps", dialogue.fps))
            if abs(rate - dialogue.fps) > 1e-6:
                raise ValueError(f"{file}: features at {rate} fps but dialogue {dialogue.id!r} wants {dialogue.fps}")
            return tokens
        if self.encoder is None or dialogue.video is None:
            raise MissingFeaturesError(f"dialogue {dialogue.id!r}: no features and no encoder to make them")
        return self._encode(dialogue)

    def _encode(self, dialogue: Dialogue) -> torch.Tensor:
        from livevlm.video import read_frames

        limit = min(dialogue.num_frames(), self.max_frames)
        frames = []
        previous = None  # the frame before the clip, which `change_hues` compares its first with (as a cache does)
        for time_s, frame in read_frames(self.root / dialogue.video, fps=dialogue.fps, size=self.encoder.image_size,
                                         resample=self.encoder.resample):
            if time_s + 1e-6 < dialogue.start_s:
                previous = frame
                continue
            frames.append(frame)
            if len(frames) == limit:
                break
        return self.encoder.encode(frames, previous=previous)

    def __getitem__(self, index: int) -> StreamSample:
        dialogue = self.dialogues[index]
        tokens = self.frame_tokens(dialogue)  # [T, N, D]
        if tokens.shape[1] != self.fmt.tokens_per_frame:
            raise ValueError(f"dialogue {dialogue.id!r}: features have {tokens.shape[1]} tokens per frame, the "
                             f"model expects {self.fmt.tokens_per_frame}; re-encode with matching grid/pooled_token")
        turns = [(t.role, t.time_s, t.text) for t in dialogue.turns]
        items = timeline_to_items(turns, num_frames=len(tokens), fps=dialogue.fps, start_s=dialogue.start_s)
        rendered = self.fmt.render(items)
        frame_target = torch.tensor(rendered.frame_target)
        key_target = torch.zeros_like(frame_target)
        for frame in dialogue.key_frames():
            if frame < len(rendered.frame_ends):  # key frames after a max_frames cut are gone with their frames
                key_target[rendered.frame_ends[frame]] = True
        return StreamSample(torch.tensor(rendered.input_ids), torch.tensor(rendered.labels), frame_target,
                            tokens[: rendered.num_frames], dialogue.id, rendered.frame_ends, key_target & frame_target)


def collate_streams(samples: list[StreamSample], pad_id: int, frame_targets: bool = True) -> dict[str, torch.Tensor]:
    """Right-pad to the longest stream. Frame tokens are concatenated `[ΣT, N, D]` in placeholder order, with
    `frame_counts` `[B]` (each row's T), the streams' boundaries the model needs (`LiveModel.embed`).

    frame_targets=False unlabels the frames' silence/speak targets (training on responses only, the
    "interleaved dialogue" baseline), so that every count of labelled tokens leaves them out.
    """
    length = max(len(s.input_ids) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE, dtype=torch.long)
    frame_target = torch.zeros((batch, length), dtype=torch.bool)
    key_target = torch.zeros((batch, length), dtype=torch.bool)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[row, :n] = s.input_ids
        labels[row, :n] = s.labels if frame_targets else s.labels.masked_fill(s.frame_target, IGNORE)
        frame_target[row, :n] = s.frame_target
        if s.key_target is not None:
            key_target[row, :n] = s.key_target
        attention_mask[row, :n] = 1
    frame_tokens = torch.cat([s.frame_tokens for s in samples])  # [ΣT, N, D]
    frame_counts = torch.tensor([len(s.frame_tokens) for s in samples], dtype=torch.long)  # [B]
    return {"input_ids": input_ids, "labels": labels, "frame_target": frame_target, "key_target": key_target,
            "attention_mask": attention_mask, "frame_tokens": frame_tokens, "frame_counts": frame_counts}
