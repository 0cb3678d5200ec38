"""The shipped default model: checksums catch damage; a damaged or missing model says how to recover."""

import pytest

from livevlm.default_model import DefaultModelError, verify_checksums, write_checksums


def test_checksums_pass_then_catch_a_changed_byte(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"weights")
    (tmp_path / "livevlm.yaml").write_text("model: {}\n")
    write_checksums(tmp_path)
    verify_checksums(tmp_path)
    (tmp_path / "a.safetensors").write_bytes(b"weightz")
    with pytest.raises(DefaultModelError, match="a.safetensors is missing or damaged"):
        verify_checksums(tmp_path)


def test_missing_checksum_file_names_the_remedy(tmp_path):
    with pytest.raises(DefaultModelError, match="reinstall livevlm"):
        verify_checksums(tmp_path)
