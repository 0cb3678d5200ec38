"""Streaming-dialogue data: the JSONL schema, converters from offline annotations, features, datasets.

Importing the package is cheap (no torch): the schema is re-exported here; `dataset` and `features`
are imported where they are used.
"""

from livevlm.data.schema import (
    Dialogue,
    DialogueError,
    Turn,
    iter_dialogues,
    read_dialogues,
    write_dialogues,
    write_jsonl,
)

__all__ = ["Dialogue", "DialogueError", "Turn", "iter_dialogues", "read_dialogues", "write_dialogues",
           "write_jsonl"]
