"""`write_text_atomically`: a failed write leaves the old file, and no temporary file behind."""

import pytest

from livevlm.files import write_text_atomically


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
