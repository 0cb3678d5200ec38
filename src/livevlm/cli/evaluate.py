"""`livevlm evaluate --data FILE.jsonl`: stream metrics of a model, printed as strict JSON.

Teacher-forced by default (one forward over the ground-truth stream: LM-PPL, LM-Correctness, TimeDiff,
Fluency); with `--free-running`, each record streams through the real engine and the model's own responses
are matched to the ground-truth turns (trigger precision / recall / F1, TimeDiff, duplicates, word F1), and
with `--judge` scored by a judge (judge score, PAUC: `livevlm.evaluation.judge`, `livevlm.evaluation.pauc`).
`--benchmark coin*` / `ego4d-lta` run the paper's offline benchmarks on the user's COIN / Ego4D files (a question
about each clip, answered greedily: `livevlm.evaluation.coin_benchmark`, `livevlm.evaluation.lta_benchmark`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from livevlm.cli import CommandError
from livevlm.devices import DtypeName

log = logging.getLogger(__name__)

OFFLINE_BENCHMARKS = ("coin-step", "coin-task", "coin-next", "coin-procedure", "coin-procedure+", "coin", "ego4d-lta")


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
                "1 s (then the lowest TimeDiff) as the model's recommended θ; with --free-running, the θ whose own "
                "responses match the turns best (of the θs within one turn of the best F1, the fewest duplicates), "
                "streaming once per θ; use a validation split"})
    benchmark: str = field(default="", metadata={
        "help": "world = the synthetic proactive benchmark: held-out synthetic-world videos (--videos, --seed, "
                "--duration; default the default model's held-out set) streamed free-running (no --data); "
                "coin-step, coin-task, coin-next, coin-procedure, coin-procedure+ (or coin: all five) = the paper's "
                "COIN benchmarks (--data COIN.json --video-dir DIR); ego4d-lta = Ego4D long-term action "
                "anticipation, ED@20 (--data fho_lta_val.json --video-dir DIR)"})
    videos: int = field(default=20, metadata={"help": "--benchmark world: how many videos"})
    seed: int = field(default=1, metadata={"help": "--benchmark world: the videos' seed (1 = the held-out set)"})
    duration: float = field(default=30.0, metadata={"help": "--benchmark world: seconds per video"})
    video_dir: str = field(default="", metadata={
        "help": "--benchmark coin*/ego4d-lta: the folder of the videos (COIN: {youtube_id}.mp4; Ego4D: "
                "{video_uid}.mp4 full videos or {clip_uid}.mp4 clips; another extension is found too)"})
    subset: str = field(default="", metadata={
        "help": "--benchmark coin*: the videos whose subset contains this (default testing, the paper's split)"})
    taxonomy: str = field(default="", metadata={
        "help": "--benchmark ego4d-lta: fho_lta_taxonomy.json (default: the one next to --data, else the verb and "
                "noun names of --data)"})
    skip_missing: bool = field(default=False, metadata={
        "help": "--benchmark coin*/ego4d-lta: leave out (and list) the videos that are missing instead of failing"})
    free_running: bool = field(default=False, metadata={
        "help": "stream each record through the real engine (its queries at their times) and match the model's "
                "own responses to the ground-truth turns one to one within --tolerance"})
    tolerance: float = field(default=1.0, metadata={"help": "--free-running: seconds a response may be off a turn"})
    results: str = field(default="", metadata={
        "help": "--free-running: JSONL file keeping each finished record's scores (--benchmark coin*/ego4d-lta: "
                "each answer); rerun with it to resume"})
    max_new_tokens: int = field(default=0, metadata={
        "help": "cap on a response's length; 0 = the evaluation's own: 64 free-running, 128 COIN, 256 Ego4D LTA"})
    judge: str = field(default="", metadata={
        "help": "--free-running: add judge_score (1–5) and PAUC at ω 0, 0.5, 1, scored by `words` (word F1, "
                "offline) or `openai` (an LLM behind an OpenAI-compatible server: --base-url, --judge-model)"})
    base_url: str = field(default="", metadata={
        "help": "--judge openai: the server's …/v1 URL (default: $OPENAI_BASE_URL, else http://127.0.0.1:8000/v1)"})
    judge_model: str = field(default="", metadata={
        "help": "--judge openai: the model to ask (default: $OPENAI_MODEL, else the server's first)"})
    api_key: str = field(default="", metadata={
        "help": "--judge openai: the server's key (default: $OPENAI_API_KEY; local servers need none)"})
    judge_retries: int = field(default=4, metadata={"help": "--judge openai: retries of a failed request"})
    max_frames: int = field(default=1200, metadata={
        "help": "truncate streams to this many frames (--benchmark coin*/ego4d-lta: a longer clip keeps its last "
                "frames)"})
    limit: int = field(default=0, metadata={
        "help": "evaluate only the first N dialogues (--benchmark coin*: questions of each kind; ego4d-lta: "
                "questions) (0 = all)"})
    device: str = field(default="auto", metadata={"help": "where the model runs: auto (a GPU when there is one), "
                                                           "cpu, cuda, cuda:1, …"})
    dtype: DtypeName = field(default="float32", metadata={
        "help": "weight precision: float32 by default, so that figures compare across machines (the README's "
                "are float32); auto = bfloat16 on a GPU, faster, with figures moved by rounding"})


def evaluate(args: EvaluateArgs) -> int:
    """The command. A judge (--judge) is made first, so that an unreachable one fails before the model loads,
    and its failure mid-run is one line (what was finished stays in --results)."""
    from livevlm.evaluation.judge import JudgeError

    judge = None
    try:
        judge = _judge(args)
        return _evaluate(args, judge)
    except JudgeError as exc:
        raise CommandError(str(exc)) from None
    finally:
        if judge is not None:
            judge.close()


def _judge(args: EvaluateArgs):
    """The --judge, or None; its options checked."""
    from livevlm.evaluation.judge import JUDGES, make_judge

    server = {"--base-url": args.base_url, "--judge-model": args.judge_model, "--api-key": args.api_key}
    if not args.judge:
        if given := [flag for flag, value in server.items() if value]:
            raise CommandError(f"{', '.join(given)} set the judge's server: add --judge openai")
        return None
    if args.judge not in JUDGES:
        raise CommandError(f"--judge {args.judge}: choose one of {', '.join(JUDGES)}")
    if not (args.free_running or args.benchmark):
        raise CommandError("--judge scores what the model says free-running: add --free-running")
    if args.judge_retries < 0:
        raise CommandError(f"--judge-retries {args.judge_retries}: give a count ≥ 0")
    if args.judge == "words":
        if given := [flag for flag, value in server.items() if value]:
            raise CommandError(f"--judge words asks no server: drop {', '.join(given)}")
        return make_judge("words")
    return make_judge("openai", base_url=args.base_url, model=args.judge_model, api_key=args.api_key,
                      retries=args.judge_retries)


def _evaluate(args: EvaluateArgs, judge=None) -> int:
    from livevlm.config import check_threshold
    from livevlm.default_model import DEFAULT_MODEL_DIR, is_default

    if args.benchmark in OFFLINE_BENCHMARKS:
        return _offline(args, judge)
    if args.benchmark and args.benchmark != "world":
        raise CommandError(f"--benchmark {args.benchmark}: choose one of world, {', '.join(OFFLINE_BENCHMARKS)}; for "
                           "your own data give --data FILE.jsonl")
    if given := [flag for flag, value in _offline_flags(args).items() if value]:
        raise CommandError(f"{', '.join(given)}: for --benchmark coin*/ego4d-lta only")
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
    if args.free_running and len(args.threshold) > 1 and not args.choose_threshold:
        raise CommandError("--free-running streams with one θ: give at most one --threshold (several only with "
                           "--choose-threshold, which streams once per θ and keeps the best)")
    if args.free_running and args.choose_threshold and not args.threshold:
        raise CommandError("--free-running --choose-threshold streams once per θ: give the θs to try with "
                           "--threshold (e.g. --threshold 0.6 --threshold 0.7 --threshold 0.8)")
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
                                      tolerance_s=args.tolerance, results=args.results or None, progress=True,
                                      judge=judge)
        print(json.dumps(json_ready(result), indent=2, allow_nan=False))
        return 0
    if args.free_running and args.choose_threshold:
        return _choose_free_running(args, model, judge)
    if args.free_running:
        result = model.evaluate_free_running(args.data, args.features or None,
                                             threshold=args.threshold[0] if args.threshold else None,
                                             tolerance_s=args.tolerance, max_new_tokens=args.max_new_tokens or 64,
                                             max_frames=args.max_frames, limit=args.limit,
                                             results=args.results or None, progress=True, judge=judge)
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


def _choose_free_running(args: EvaluateArgs, model, judge=None) -> int:
    """--free-running --choose-threshold: stream --data once per --threshold and store the θ with the best
    free-running F1 (`choose_free_running_threshold`) as the model's recommended θ. With --results, each θ keeps
    its own file (`NAME-theta0.7.jsonl`), so an interrupted sweep resumes θ by θ."""
    from livevlm.checkpoint import store_recommended_threshold
    from livevlm.evaluation.free_running import choose_free_running_threshold
    from livevlm.evaluation.stream_eval import json_ready, sweep_edge_warning

    by_threshold = {}
    for threshold in args.threshold:
        results = Path(args.results) if args.results else None
        if results is not None:
            results = results.with_name(f"{results.stem}-theta{threshold:g}{results.suffix or '.jsonl'}")
        by_threshold[threshold] = model.evaluate_free_running(
            args.data, args.features or None, threshold=threshold, tolerance_s=args.tolerance,
            max_new_tokens=args.max_new_tokens or 64, max_frames=args.max_frames, limit=args.limit,
            results=results, progress=True, judge=judge)
    chosen = choose_free_running_threshold(by_threshold)
    store_recommended_threshold(args.model, chosen)
    if warning := sweep_edge_warning(chosen, list(by_threshold)):
        log.warning(warning)
    result = {"chosen_threshold": chosen, "by_threshold": {f"{t:g}": r for t, r in by_threshold.items()}}
    print(json.dumps(json_ready(result), indent=2, allow_nan=False))
    return 0


def _offline_flags(args: EvaluateArgs) -> dict[str, object]:
    """The options only the offline benchmarks (COIN, Ego4D LTA) take, by flag."""
    return {"--video-dir": args.video_dir, "--subset": args.subset, "--taxonomy": args.taxonomy,
            "--skip-missing": args.skip_missing}


def _offline(args: EvaluateArgs, judge=None) -> int:
    """--benchmark coin* / ego4d-lta: the paper's offline benchmarks on the user's COIN / Ego4D files: a question
    about each clip answered greedily, then scored (accuracy against the categories, or ED@20)."""
    name, lta = args.benchmark, args.benchmark == "ego4d-lta"
    file = "fho_lta_val.json" if lta else "COIN.json"
    if not args.data or not args.video_dir:
        raise CommandError(f"--benchmark {name} needs the annotations and their videos: --data {file} --video-dir DIR")
    if not Path(args.data).is_file():
        raise CommandError(f"--data {args.data} does not exist")
    if not Path(args.video_dir).is_dir():
        raise CommandError(f"--video-dir {args.video_dir} is not a folder")
    others = {"--free-running": args.free_running, "--choose-threshold": args.choose_threshold,
              "--threshold": args.threshold, "--features": args.features, "--judge": judge is not None,
              "--taxonomy": args.taxonomy and not lta, "--subset": args.subset and lta}
    if given := [flag for flag, value in others.items() if value]:
        raise CommandError(f"--benchmark {name} answers questions about clips and scores the answers: drop "
                           f"{', '.join(given)}")
    if args.taxonomy and not Path(args.taxonomy).is_file():
        raise CommandError(f"--taxonomy {args.taxonomy} does not exist")
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--max-frames", args.max_frames),
                        ("--limit", args.limit)):
        if value < 0:
            raise CommandError(f"{flag} {value}: give a count ≥ 0 (0 = the default)")
    # The annotations and videos are checked before the model loads, so that a bad file fails at once (cheap:
    # JSON and file names; the model's run builds the questions again at its own fps).
    if lta:
        from livevlm.evaluation.lta_benchmark import build_lta_questions

        build_lta_questions(args.data, args.video_dir, taxonomy=args.taxonomy or None, limit=args.limit,
                            skip_missing=args.skip_missing)
    else:
        from livevlm.evaluation.coin_benchmark import build_coin_questions

        build_coin_questions(args.data, args.video_dir, name, subset=args.subset or "testing", limit=args.limit,
                             skip_missing=args.skip_missing)
    from livevlm import runtime

    runtime.use_all_cores()
    import livevlm
    from livevlm.evaluation.stream_eval import json_ready

    model = livevlm.load(args.model or "default", llm=args.llm or None, vision=args.vision or None,
                         device=args.device, dtype=args.dtype)
    common = {"max_new_tokens": args.max_new_tokens or None, "max_frames": args.max_frames, "limit": args.limit,
              "skip_missing": args.skip_missing, "results": args.results or None, "progress": True}
    if lta:
        result = model.evaluate_lta(args.data, args.video_dir, taxonomy=args.taxonomy or None, **common)
    else:
        result = model.evaluate_coin(name, args.data, args.video_dir, subset=args.subset or "testing", **common)
    print(json.dumps(json_ready(result), indent=2, allow_nan=False))
    return 0


def _official(model: str) -> bool:
    """The paper's checkpoint, by folder or hub id (read-only here: --choose-threshold cannot write into it)."""
    from livevlm.official import is_official_folder, looks_like_hub_id

    return bool(model) and (is_official_folder(model) or looks_like_hub_id(model))
