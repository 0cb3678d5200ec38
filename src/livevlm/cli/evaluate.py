"""`livevlm evaluate --data FILE.jsonl`: teacher-forced stream metrics of a model, printed as strict JSON."""

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
    model: str = field(default="", metadata={"help": "checkpoint folder; empty = the shipped default model"})
    features: str = field(default="", metadata={"help": "feature cache folder; empty = encode videos on the fly"})
    threshold: list[float] = field(default_factory=list, metadata={
        "help": "speak thresholds θ to report, the first at top level (default: the model's recommended θ if "
                "it has one, the engine's 0.725 and 0, as the paper)"})
    choose_threshold: bool = field(default=False, metadata={
        "help": "store in the --model folder the θ (among --threshold) that times most turns of --data within "
                "1 s (then the lowest TimeDiff) as the model's recommended θ; use a validation split"})
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

    if not args.data:
        raise CommandError("give the dialogue file to evaluate on: livevlm evaluate --data FILE.jsonl")
    if not Path(args.data).is_file():
        raise CommandError(f"--data {args.data} does not exist")
    if args.features and not Path(args.features).is_dir():
        raise CommandError(f"--features {args.features} is not a folder; make it with `livevlm data encode`")
    if args.choose_threshold and (is_default(args.model) or Path(args.model).resolve() == DEFAULT_MODEL_DIR.resolve()):
        raise CommandError("--choose-threshold writes into the model folder: name a trained checkpoint with "
                           "--model (the shipped default model is read-only; copy its folder first)")
    for threshold in args.threshold:
        check_threshold(threshold, "--threshold")
    from livevlm import runtime

    runtime.use_all_cores()
    import livevlm
    from livevlm.checkpoint import store_recommended_threshold
    from livevlm.evaluation.stream_eval import choose_threshold, json_ready, sweep_edge_warning

    model = livevlm.load(args.model or "default", device=args.device, dtype=args.dtype)
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
