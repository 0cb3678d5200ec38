"""Append hue histograms (`model.hue_bins`) to an existing feature cache, without running the vision tower again.

Why: re-encoding the default model's 120 training videos takes 22 minutes on 2 CPU cores, nearly all of it
DINOv2; the hue channels need only the decoded frames (a minute). The files written equal what
`livevlm data encode … --hue-bins K` writes (the same decoder, letterbox and `FrameEncoder.token_hues`); with
`--check` the first video is also encoded in full and compared.

    python experiments/add_hue_bins.py data/world-train5/dialogue.jsonl data/world-train5/features-rgb \
        data/world-train5/features-hue12 --hue-bins 12 --check
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from livevlm.data.features import feature_name, load_features, save_features
from livevlm.data.schema import read_dialogues
from livevlm.default_model import resolve_vision
from livevlm.video import read_frames
from livevlm.vision import load_frame_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dialogues", help="the dialogue JSONL whose videos the cache holds")
    parser.add_argument("cache", help="the existing cache folder (its encoder settings are kept)")
    parser.add_argument("out", help="the new cache folder")
    parser.add_argument("--hue-bins", type=int, default=12)
    parser.add_argument("--check", action="store_true", help="encode the first video in full and compare")
    args = parser.parse_args()

    dialogues_path = Path(args.dialogues)
    videos = sorted({d.video for d in read_dialogues(dialogues_path) if d.video is not None})
    encoder = None
    for index, video in enumerate(videos):  # each at the rate its cache file was encoded at
        source, target = Path(args.cache) / feature_name(video), Path(args.out) / feature_name(video)
        tokens, metadata = load_features(source)  # [T, N, D]
        if int(metadata.get("hue_bins", "0")):
            raise SystemExit(f"{source} already has hue bins")
        if encoder is None:
            encoder = load_frame_encoder(resolve_vision(metadata.get("encoder") or "default"),
                                         int(metadata["frame_size"]), metadata["pooled_token"] == "True",
                                         int(metadata["grid"]), mean_rgb=metadata.get("mean_rgb") == "True",
                                         hue_bins=args.hue_bins)
        frames = [frame for _, frame in read_frames(dialogues_path.parent / video, fps=float(metadata["fps"]),
                                                    size=encoder.image_size, resample=encoder.resample)]
        if len(frames) != tokens.shape[0]:
            raise SystemExit(f"{video}: {len(frames)} frames decoded, {tokens.shape[0]} in {source}")
        hues = torch.cat([encoder.token_hues(encoder.preprocess(frames[i:i + 32])) for i in range(0, len(frames), 32)])
        widened = torch.cat([tokens, hues], dim=-1)  # [T, N, D + K]
        if args.check and index == 0:
            full = encoder.encode(frames)
            error = (full - widened).abs().max().item()
            print(f"check {video}: max |full encode - appended| = {error:.2e}")
            if error > 1e-3:
                raise SystemExit("the appended cache differs from a full encode")
        save_features(target, widened, {**metadata, "hue_bins": str(args.hue_bins)})
    print(f"{len(videos)} videos written to {args.out} with {args.hue_bins} hue bins")


if __name__ == "__main__":
    main()
