"""Can a vision tower's frame tokens tell a new object's colour and shape? A linear probe on the synthetic world.

Why: the default model names colours wrong more than anything else, and the question is whether the frozen
features or the model is at fault. For every "appear" event, the frame one step after the object is first
shown is encoded, the patch grid is average-pooled to k x k, and the cell under the object's centre is
kept. A linear classifier is trained on the training videos' appearances and tested on held-out ones; the
mean RGB of the same cell is probed beside it, as a reference that keeps colour by construction, and so is
what a model gets: the change of the whole frame's tokens (pooled token + grid, as the encoder is configured)
from 1.5 s before (so only appearances at least 1.5 s into a video count). Prints a table (accuracy per
input); asserts nothing.

    python experiments/probes/feature_probe.py data/world-train/annotations.jsonl \\
        data/world-heldout/annotations.jsonl data/world-val/annotations.jsonl --grids 3 4 6 8
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TARGETS = ("color", "shape")


def appearances(annotations: Path, encoder, grids: list[int], videos: int) -> list[dict]:
    """One row per appearance: its colour and shape, and per k the feature and the mean RGB of its cell."""
    from livevlm.video import read_frames

    rows = []
    for line in annotations.read_text().splitlines()[: videos or None]:
        record = json.loads(line)
        fps = float(record.get("fps", 2))
        events = [e for e in record["events"]
                  if e["kind"] == "appear" and 0 <= min(e["center"]) <= max(e["center"]) < 1]  # inside the frame
        if not events:
            continue
        frames = {round(t * fps): f for t, f in read_frames(str(annotations.parent / record["video"]), fps=fps,
                                                             size=encoder.image_size)}
        # the first sampled frame at or after the event shows it; one step later it is surely whole
        picks = [(e, frames[k], frames[k - 3]) for e in events
                 if (k := math.ceil(e["time_s"] * fps - 1e-6) + 1) in frames and k - 3 in frames]
        if not picks:
            continue
        after, before = np.stack([p[1] for p in picks]), np.stack([p[2] for p in picks])
        _, patches = encoder.tower_tokens(encoder.preprocess(after))  # [B, P, D]
        cells = {k: encoder.pool_grid(patches, k).float() for k in grids}  # k -> [B, k*k, D], row-major
        pixels = torch.from_numpy(after).permute(0, 3, 1, 2).float() / 255  # [B, 3, S, S]
        change = (encoder.encode(after) - encoder.encode(before)).flatten(1)  # the frame tokens' change [B, N*D]
        for b, (event, _, _) in enumerate(picks):
            x, y = event["center"]
            row = {"color": event["object"]["color"], "shape": event["object"]["shape"],
                   "the model's frame tokens, change": change[b]}
            for k in grids:
                row[f"features {k}x{k}"] = cells[k][b, int(y * k) * k + int(x * k)]
                row[f"RGB {k}x{k}"] = F.adaptive_avg_pool2d(pixels[b], k)[:, int(y * k), int(x * k)]
            rows.append(row)
    return rows


def probe_accuracy(train: list[dict], test: list[dict], key: str, target: str, steps: int = 500) -> float:
    """Held-out accuracy of a linear classifier (standardised inputs, AdamW, full batch)."""
    labels = sorted({r[target] for r in train})
    test = [r for r in test if r[target] in labels]
    x_train, x_test = torch.stack([r[key] for r in train]), torch.stack([r[key] for r in test])
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = torch.tensor([labels.index(r[target]) for r in train])
    y_test = torch.tensor([labels.index(r[target]) for r in test])
    torch.manual_seed(0)
    linear = torch.nn.Linear(x_train.shape[1], len(labels))
    optimizer = torch.optim.AdamW(linear.parameters(), lr=1e-2 if x_train.shape[1] < 16 else 1e-3, weight_decay=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(linear(x_train), y_train).backward()
        optimizer.step()
    return (linear(x_test).argmax(1) == y_test).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train", type=Path, help="annotations.jsonl of the training videos")
    parser.add_argument("test", type=Path, nargs="+", help="annotations.jsonl of held-out videos")
    parser.add_argument("--encoder", default="default", help="vision tower folder, or 'default' (DINOv2-small)")
    parser.add_argument("--frame-size", type=int, default=224)
    parser.add_argument("--grids", type=int, nargs="+", default=[3, 4, 6, 8])
    parser.add_argument("--videos", type=int, default=0, help="training videos to use (0: all)")
    args = parser.parse_args()

    from livevlm.backbones import resolve_vision
    from livevlm.vision import load_frame_encoder

    encoder = load_frame_encoder(resolve_vision(args.encoder), args.frame_size)
    train = appearances(args.train, encoder, args.grids, args.videos)
    test = [row for path in args.test for row in appearances(path, encoder, args.grids, 0)]
    print(f"{len(train)} training and {len(test)} held-out appearances; linear probe accuracy on the held-out ones\n")
    print("| input (the cell under the object, or the whole frame) | colour | shape |\n|---|---|---|")
    for key in [f"{kind} {k}x{k}" for kind in ("features", "RGB") for k in args.grids] + [
            "the model's frame tokens, change"]:
        scores = " | ".join(f"{probe_accuracy(train, test, key, target):.0%}" for target in TARGETS)
        print(f"| {key} | {scores} |")


if __name__ == "__main__":
    main()
