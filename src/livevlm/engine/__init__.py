"""The streaming engine: one session per stream (KV cache, decisions, queries), batched sessions, the async
pipeline."""

from livevlm.engine.batch import SessionBatch
from livevlm.engine.pipeline import StreamPipeline, StreamSummary
from livevlm.engine.session import (
    Event,
    FrameEvent,
    NoteEvent,
    QueryEvent,
    ResponseEvent,
    StreamSession,
    TokenEvent,
)

__all__ = ["Event", "FrameEvent", "NoteEvent", "QueryEvent", "ResponseEvent", "SessionBatch", "StreamPipeline",
           "StreamSession", "StreamSummary", "TokenEvent"]
