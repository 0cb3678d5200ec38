"""`livevlm data convert | validate | synthesize | encode`: dialogue data, from annotations to frame features.

`convert` and `synthesize` take the library's own typed configs (`ConvertOptions`, `SynthesisOptions`) as
their arguments, so an option and the config field it sets are one thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from livevlm.cli import CommandError
from livevlm.data.converters.common import ConvertOptions as ConvertArgs
from livevlm.data.synthesize import SynthesisOptions as SynthesizeArgs

__all__ = ["ConvertArgs", "EncodeArgs", "SynthesizeArgs", "ValidateArgs", "convert", "encode", "synthesize",
           "validate"]


def convert(args: ConvertArgs) -> int:
    """Convert, then print what was written."""
    from livevlm.data.convert import convert as convert_annotations

    count, turns = convert_annotations(args)
    print(f"{args.output}: {count} dialogues, {turns} turns")
    if args.benchmarks:
        print(f"{args.benchmarks}: COIN benchmark samples")
    return 0


@dataclass
class ValidateArgs:
    path: str = field(metadata={"help": "dialogue JSONL file to check"})
    check_videos: bool = field(default=False, metadata={"help": "also check that every referenced video "
                                                                "file exists"})
    max_errors: int = field(default=10, metadata={"help": "stop after this many errors"})


def validate(args: ValidateArgs) -> int:
    """Print "N dialogues, M turns: ok" or the first errors (exit 1)."""
    from livevlm.data.schema import check_file

    n_dialogues, n_turns, errors = check_file(args.path, args.check_videos, args.max_errors)
    if errors:
        for message in errors:
            print(message)
        more = " (stopped there)" if len(errors) >= args.max_errors else ""
        print(f"{args.path}: {len(errors)} error(s){more}")
        return 1
    print(f"{n_dialogues} dialogues, {n_turns} turns: ok")
    return 0


def synthesize(args: SynthesizeArgs) -> int:
    """Run, print the report; exit 1 when items failed or were not attempted."""
    from livevlm.data.backends import BackendError
    from livevlm.data.synthesize import run_synthesis

    try:
        report = run_synthesis(args)
    except BackendError as exc:
        raise CommandError(f"backend {args.backend}: {exc}") from None
    for line in report.lines():
        print(line)
    print(f"{args.output}: {report.conversations} new conversations; report in {args.output}.report.json")
    return 0 if report.ok else 1


@dataclass
class EncodeArgs:
    dialogues: str = field(metadata={"help": "dialogue JSONL whose videos to encode"})
    out: str = field(default="", metadata={"help": "cache folder (default: features/ beside the JSONL)"})
    encoder: str = field(default="default", metadata={"help": "vision tower folder, or 'default' (DINOv2-small)"})
    frame_size: int = field(default=224, metadata={"help": "square side frames are letterboxed to"})
    grid: int = field(default=3, metadata={"help": "k of the k x k pooled patch grid"})
    pooled_token: bool = field(default=True, metadata={"help": "prepend the pooled/CLS token"})
    mean_rgb: bool = field(default=False, metadata={"help": "append each token's mean pixel colour (for a "
                                                            "model with model.mean_rgb: true)"})
    hue_bins: int = field(default=0, metadata={"help": "append each token's histogram of pixel hues in this many bins "
                                                       "(for a model with model.hue_bins set; 0 = none)"})
    change_hues: bool = field(default=False, metadata={"help": "append each token's hue histogram of the pixels "
                                                               "changed since the frame before (for a model with "
                                                               "model.change_hues: true; needs --hue-bins)"})
    batch_size: int = field(default=16, metadata={"help": "frames per encoder forward"})
    fps: float = field(default=0.0, metadata={"help": "sampling rate; 0 = each dialogue's own fps"})
    device: str = field(default="auto", metadata={"help": "where the encoder runs: auto (cuda if available), "
                                                           "cpu, cuda, cuda:1, …"})
    workers: int = field(default=1, metadata={"help": "processes decoding videos while the encoder runs "
                                                      "(worth it on a GPU, where decoding is the bottleneck)"})
    used_frames_only: bool = field(default=False, metadata={"help": "encode only the frames the dialogues cover "
                                                                     "(a cache of short clips cut from long videos, "
                                                                     "for this dialogue file only)"})


def encode(args: EncodeArgs) -> int:
    """Encode every video of the dialogue file into the cache (skipping finished ones) and say where."""
    from livevlm import runtime
    from livevlm.data.features import encode_dialogue_videos
    from livevlm.default_model import resolve_vision
    from livevlm.devices import resolve_device
    from livevlm.vision import load_frame_encoder

    device = resolve_device(args.device)
    runtime.use_all_cores()
    encoder = load_frame_encoder(resolve_vision(args.encoder), args.frame_size, args.pooled_token, args.grid,
                                 device=device, mean_rgb=args.mean_rgb, hue_bins=args.hue_bins,
                                 change_hues=args.change_hues)
    out = Path(args.out) if args.out else Path(args.dialogues).parent / "features"
    files = encode_dialogue_videos(args.dialogues, encoder, out, args.fps or None, args.batch_size, args.encoder,
                                   workers=args.workers, used_frames_only=args.used_frames_only)
    which = "the used frames of " if args.used_frames_only else ""
    print(f"{which}{len(files)} videos encoded into {out} (encoder on {device})")
    return 0
