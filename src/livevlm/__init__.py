"""livevlm: online video LLMs that watch a stream and decide by themselves when to speak.

    import livevlm
    model = livevlm.load("default")
    for event in model.stream("video.mp4", queries=[(0.0, "Please narrate the video in real time.")]):
        ...

Importing the package is cheap and changes nothing in the process: the API (`livevlm.api`) and the event
types are loaded on first use, and process-wide settings live in `livevlm.runtime`, applied only by the
`livevlm` command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load": "livevlm.api", "evaluate": "livevlm.api", "LiveVLM": "livevlm.api", "Stream": "livevlm.api",
    "FrameEvent": "livevlm.engine.session", "QueryEvent": "livevlm.engine.session",
    "ResponseEvent": "livevlm.engine.session", "Event": "livevlm.engine.session", "NoteEvent": "livevlm.engine.session",
    "TokenEvent": "livevlm.engine.session", "TextDeltas": "livevlm.detokenize",
    "StreamSummary": "livevlm.engine.pipeline",
}
__all__ = ["Event", "FrameEvent", "LiveVLM", "NoteEvent", "QueryEvent", "ResponseEvent", "Stream", "StreamSummary",
           "TextDeltas", "TokenEvent", "__version__", "evaluate", "load"]

if TYPE_CHECKING:
    from livevlm.api import LiveVLM, Stream, evaluate, load
    from livevlm.detokenize import TextDeltas
    from livevlm.engine.pipeline import StreamSummary
    from livevlm.engine.session import Event, FrameEvent, NoteEvent, QueryEvent, ResponseEvent, TokenEvent


def __getattr__(name: str) -> Any:
    """Load the API on first use (torch and transformers take seconds to import)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'livevlm' has no attribute {name!r}")
