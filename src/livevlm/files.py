"""Writing a file so that a reader never sees it half-written, even after a crash or a power loss.

A run killed mid-write (out of disk, Ctrl-C, a preempted job) must leave the previous version of a file or no
file at all, never a truncated one that later fails to parse: recipes, checkpoint configs, feature caches,
annotation and metric logs are all read back by the next run. Every such write goes through `atomic_path`:
the content goes to a hidden temporary file beside the target (same file system, so the rename is atomic),
which is fsync'ed (its data is on disk before the name points at it: without this a power loss after the
rename can leave an empty file under the new name) and then replaces the target in one `os.replace`; the
folder is fsync'ed after (best effort), so the rename itself survives a power loss.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on success it is fsync'ed and renamed to `path`.

    For writers that want a path rather than bytes: `with atomic_path(out) as tmp: save_file(tensors, str(tmp))`.
    The temporary name keeps the target's suffix (`.x.png.tmp-<pid>-<random>.png`), so writers that pick the
    format from the extension still do. Readers see the old file or the new one, nothing between.

    Raises:
        Whatever the body raises, and OSError from the fsync or the rename; the temporary file is then removed
        and `path` left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)  # fsync through a read-only descriptor flushes the file's data too
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_bytes_atomically(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` all at once (see `atomic_path`); → `path`."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(data)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` all at once: readers see the old file or the new one, nothing between."""
    return write_bytes_atomically(path, text.encode("utf-8"))


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new entry in `folder` durable; best effort (some systems cannot open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under `root` (and `root`): before a whole folder is renamed into place,
    its contents must be on disk, or a power loss can leave a complete-looking folder of empty files."""
    root = Path(root)
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)
