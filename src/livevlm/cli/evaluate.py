"""`livevlm evaluate --data FILE.jsonl`: stream metrics of a model, printed as strict JSON.

Teacher-forced by default (one forward over the ground-truth stream: LM-PPL, LM-Correctness, TimeDiff,
Fluency); with `--free-running`, each record streams through the real engine and the model's own responses
are matched to the ground-truth turns (trigger precision / recall / F1, TimeDiff, duplicates, word F1).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from livevlm.cli import CommandError
from livevlm.devices import DtypeName

log = logging.getLogger(__name__)


@dataclass
class EvaluateArgs:
    data: str = field(default="", metadata={"help": "dialogue JSONL (held-out); required"})
    model: str = field(default="", metadata={
        "help": "checkpoint folder, the paper's released checkpoint (its folder or hub id); empty = the shipped "
                "default model"})
    llm: str = field(default="", metadata={"help": "base LLM folder or hub id, overriding the checkpoint's"})
    vision: str = field(default="", metadata={"help": "vision tower folder or hub id, overriding the checkpoint's"})
    features: str = field(default="", metadata={"help": "feature cache folder; empty = encode videos on the fly"})
    threshold: list[float] = field(default_factory=list, metadata={
        "help": "speak thresholds θ to report, the first at top level (default: the model's recommended θ if "
                "it has one, the engine's 0.725 and 0, as the paper)"})
    choose_threshold: bool = field(default=False, metadata={
        "help": "store in the --model folder the θ (among --threshold) that times most turns of --data within "
                "1 s (then the lowest TimeDiff) as the model's recommended θ; use a validation split"})
    benchmark: str = field(default="", metadata={
        "help": "world = the synthetic proactive benchmark: held-out synthetic-world videos (--videos, --seed, "
                "--duration; default the default model's held-out set) streamed free-running (no --data)"})
    videos: int = field(default=20, metadata={"help": "--benchmark world: how many videos"})
    seed: int = field(default=1, metadata={"help": "--benchmark world: the videos' seed (1 = the held-out set)"})
    duration: float = field(default=30.0, metadata={"help": "--benchmark world: seconds per video"})
    free_running: bool = field(default=False, metadata={
        "help": "stream each record through the real engine (its queries at their times) and match the model's "
                "own responses to the ground-truth turns one to one within --tolerance"})
    tolerance: float = field(default=1.0, metadata={"help": "--free-running: seconds a response may be off a turn"})
    results: str = field(default="", metadata={
        "help": "--free-running: JSONL file keeping each finished record's scores; rerun with it to resume"})
    max_new_tokens: int = field(default=64, metadata={"help": "--free-running: cap on a response's length"})
    max_frames: int = field(default=1200, metadata={"help": "truncate streams to this many frames"})
    limit: int = field(default=0, metadata={"help": "evaluate only the first N dialogues (0 = all)"})
    device: str = field(default="auto", metadata={"help": "where the model runs: auto (a GPU when there is one), "
                                                           "cpu, cuda, cuda:1, …"})
    dtype: DtypeName = field(default="float32", metadata={
        "help": "weight precision: float32 by default, so that figures compare across machines (the README's "
                "are float32); auto = bfloat16 on a GPU, faster, with figures moved by rounding"})


def evaluate(args: EvaluateArgs) -> int:
    from livevlm.config import check_threshold
    from livevlm.default_model import DEFAULT_MODEL_DIR, is_default

    if args.benchmark and args.benchmark != "world":
        raise CommandError(f"--benchmark {args.benchmark}: the benchmark built in is `world` (the synthetic proactive "
                           "one); for your own data give --data FILE.jsonl")
    if args.benchmark and (args.data or args.choose_threshold):
        raise CommandError("--benchmark world makes its own data: drop --data / --choose-threshold")
    if args.benchmark and (args.videos < 1 or args.duration <= 0):
        raise CommandError(f"--videos {args.videos} --duration {args.duration:g}: give at least 1 video of > 0 s")
    if args.benchmark:
        args.free_running = True
    elif not args.data:
        raise CommandError("give the dialogue file to evaluate on: livevlm evaluate --data FILE.jsonl (or "
                           "--benchmark world)")
    if args.data and not Path(args.data).is_file():
        raise CommandError(f"--data {args.data} does not exist")
    if args.features and not Path(args.features).is_dir():
        raise CommandError(f"--features {args.features} is not a folder; make it with `livevlm data encode`")
    if args.choose_threshold and (is_default(args.model) or Path(args.model).resolve() == DEFAULT_MODEL_DIR.resolve()):
        raise CommandError("--choose-threshold writes into the model folder: name a trained checkpoint with "
                           "--model (the shipped default model is read-only; copy its folder first)")
    if args.choose_threshold and _official(args.model):
        raise CommandError(f"--choose-threshold writes into a livevlm checkpoint folder, and {args.model} is the "
                           "official format (or a hub id): convert it first with `livevlm export --format livevlm "
                           f"{args.model} OUT` and evaluate OUT")
    for threshold in args.threshold:
        check_threshold(threshold, "--threshold")
    if args.free_running and (args.choose_threshold or len(args.threshold) > 1):
        raise CommandError("--free-running streams with one θ: give at most one --threshold (and choose θs with the "
                           "teacher-forced evaluation, without --free-running)")
    if args.tolerance < 0:
        raise CommandError(f"--tolerance {args.tolerance:g}: give seconds ≥ 0")
    from livevlm import runtime

    runtime.use_all_cores()
    import livevlm
    from livevlm.checkpoint import store_recommended_threshold
    from livevlm.evaluation.stream_eval import choose_threshold, json_ready, sweep_edge_warning

    model = livevlm.load(args.model or "default", llm=args.llm or None, vision=args.vision or None,
                         device=args.device, dtype=args.dtype)
    if args.benchmark:
        result = model.evaluate_world(args.videos, args.seed, args.duration,
                                      threshold=args.threshold[0] if args.threshold else None,
                                      tolerance_s=args.tolerance, results=args.results or None, progress=True)
        print(json.dumps(json_ready(result), indent=2, allow_nan=False))
        return 0
    if args.free_running:
        result = model.evaluate_free_running(args.data, args.features or None,
                                             threshold=args.threshold[0] if args.threshold else None,
                                             tolerance_s=args.tolerance, max_new_tokens=args.max_new_tokens,
                                             max_frames=args.max_frames, limit=args.limit,
                                             results=args.results or None, progress=True)
        print(json.dumps(json_ready(result), indent=2, allow_nan=False))
        return 0
    result = model.evaluate(args.data, args.features or None, args.threshold or None, args.max_frames, args.limit)
    if args.choose_threshold:
        thresholds = list(result["by_threshold"])  # type: ignore[arg-type]
        chosen = choose_threshold(result["by_threshold"])  # type: ignore[arg-type]
        store_recommended_threshold(args.model, chosen)
        result["chosen_threshold"] = chosen
        if warning := sweep_edge_warning(chosen, [float(t) for t in thresholds]):
            log.warning(warning)
    print(json.dumps(json_ready(result), indent=2, allow_nan=False))
    return 0


def _official(model: str) -> bool:
    """The paper's checkpoint, by folder or hub id (read-only here: --choose-threshold cannot write into it)."""
    from livevlm.official import is_official_folder, looks_like_hub_id

    return bool(model) and (is_official_folder(model) or looks_like_hub_id(model))
