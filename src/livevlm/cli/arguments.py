"""The dataclass-to-argparse layer of the `livevlm` command: one option per field of an argument dataclass.

Written by hand because none of the well-kept libraries fits: `HfArgumentParser` builds flat parsers
(no subcommands, no optional positionals), and typer/click would move the option definitions out of the
typed dataclasses that the library's configs already are (a library config such as
`data.converters.common.ConvertOptions` doubles as its command's argument spec, with no second copy).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per field of `cls`: positional without a default, `--name` otherwise.

    Field metadata: "help"; "aliases" (extra flags, e.g. ["--from"]); "nargs" on a list field makes it a
    trailing positional list (e.g. `key=value` overrides); "positional" makes a field with a default an
    optional positional argument.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        help_text = f.metadata.get("help", "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        origin = typing.get_origin(annotation)
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", [])]
        if origin is list and "nargs" in f.metadata:  # trailing positional list: `train RECIPE a=1 b=2`
            (item_type,) = typing.get_args(annotation)
            parser.add_argument(f.name, type=item_type, nargs=f.metadata["nargs"], help=help_text)
            continue
        if origin is list:
            (item_type,) = typing.get_args(annotation)
            default = [] if required else (f.default_factory() if f.default is dataclasses.MISSING else f.default)
            parser.add_argument(*flags, dest=f.name, type=item_type, action="append", default=None,
                                help=f"{help_text} (repeatable)")
            parser.set_defaults(**{f.name: default})
            continue
        kwargs: dict[str, Any] = {"help": help_text}
        if origin is Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif annotation is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=help_text)
            continue
        elif origin in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(annotation) if a is not type(None)][0]
            kwargs["type"] = inner
        else:
            kwargs["type"] = annotation
        if required:
            parser.add_argument(f.name, **kwargs)
        elif f.metadata.get("positional"):  # an optional positional: `stream [SOURCE]`
            parser.add_argument(f.name, nargs="?", default=f.default, **kwargs)
        else:
            kwargs["help"] = f"{help_text} (default: {f.default})".strip()
            parser.add_argument(*flags, dest=f.name, default=f.default, **kwargs)


def dataclass_from_namespace(cls: type[T], namespace: argparse.Namespace) -> T:
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return cls(**{n: getattr(namespace, n) for n in names})
