"""`files`: atomic writes leave the old file or the new one (never a half one), and no temporary file behind."""

import os

import pytest

from livevlm.files import atomic_path, fsync_tree, write_bytes_atomically, write_text_atomically


def record_fsyncs(monkeypatch) -> list[int]:
    """The inodes `livevlm.files` fsyncs, in order (each call still reaches the real `os.fsync`)."""
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr("livevlm.files.os.fsync", fsync)
    return synced


def inode(path) -> int:
    return os.stat(path).st_ino


def test_writes_and_replaces_the_text(tmp_path):
    path = tmp_path / "a.json"
    write_text_atomically(path, "old")
    assert write_text_atomically(path, "néw") == path
    assert path.read_text(encoding="utf-8") == "néw"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    path.write_text("old")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("livevlm.files.os.replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomically(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_the_bytes_variant_writes_and_replaces(tmp_path):
    path = tmp_path / "blob.bin"
    write_bytes_atomically(path, b"\x00old")
    assert write_bytes_atomically(path, b"\x00\xffnew") == path
    assert path.read_bytes() == b"\x00\xffnew"
    assert [p.name for p in tmp_path.iterdir()] == ["blob.bin"]


def test_a_writer_failing_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="killed"), atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]


def test_atomic_path_gives_a_hidden_sibling_with_the_same_suffix_and_fsyncs_it(tmp_path, monkeypatch):
    """Writers that pick the format from the extension (PIL's `save`) still can; the data is fsync'ed before
    the rename, and the folder after it."""
    synced = record_fsyncs(monkeypatch)
    path = tmp_path / "frame.png"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".frame.png.tmp-") and tmp.suffix == ".png"
        tmp.write_bytes(b"png")
    assert path.read_bytes() == b"png"
    assert synced == [inode(path), inode(tmp_path)]  # the file (the rename keeps its inode), then the folder


def test_a_writer_that_writes_nothing_fails_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(FileNotFoundError), atomic_path(path):
        pass
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_fsync_tree_syncs_every_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a").write_text("a")
    (tmp_path / "sub" / "b").write_text("b")
    synced = record_fsyncs(monkeypatch)
    fsync_tree(tmp_path)
    assert sorted(synced) == sorted(inode(p) for p in [tmp_path, tmp_path / "a", tmp_path / "sub",
                                                       tmp_path / "sub" / "b"])
