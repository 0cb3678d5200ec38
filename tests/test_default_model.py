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


def test_the_shipped_default_model_matches_its_checksums_and_lists_every_file():
    from livevlm.default_model import CHECKSUMS, DEFAULT_MODEL_DIR

    verify_checksums(DEFAULT_MODEL_DIR)  # an edited model card or weight file fails here, not at a user's
    listed = {line.split(maxsplit=1)[1] for line in (DEFAULT_MODEL_DIR / CHECKSUMS).read_text().splitlines()}
    shipped = {p.relative_to(DEFAULT_MODEL_DIR).as_posix() for p in DEFAULT_MODEL_DIR.rglob("*")
               if p.is_file() and p.name != CHECKSUMS}
    assert listed == shipped
