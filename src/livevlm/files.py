"""Writing a file so that a reader never sees it half-written.

A run killed mid-write (out of disk, Ctrl-C, a preempted job) must leave the previous version of a
metadata file or no file at all, never a truncated one that later fails to parse: recipes, checkpoint
configs, annotation and metric logs are all read back by the next run. The text goes to a hidden
temporary file beside the target (same file system, so the rename is atomic) and replaces it in one
`os.replace`.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` all at once: readers see the old file or the new one, nothing between."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
