"""Text from a response's tokens as they are decoded: the engine yields ids (`TokenEvent`), this makes words.

Why not decode each token alone: byte-level BPE splits a multi-byte character (é, 🙂) over several tokens,
and SentencePiece-style tokenizers put a word's leading space in the token, so a token's text depends on
its neighbours. So the whole response so far is decoded at each token (a response is at most a few hundred
tokens) and only the new suffix is handed out, held back while it ends in half a character (U+FFFD) or in
whitespace (the finished response's text is stripped, so trailing spaces may never come).
"""

from __future__ import annotations

_INCOMPLETE = "\ufffd"  # what a tokenizer decodes half of a multi-byte UTF-8 character to


class TextDeltas:
    """Incremental text of one response at a time: `add` each token id, get the text it completes.

    Contract: the pieces `add` returns for one response, concatenated, equal the stripped decode of all its
    ids (`ResponseEvent.text`), for any tokenizer whose decode of a prefix is a prefix of the decode of the
    whole (byte-level BPE and SentencePiece are); for one that is not, the pieces stop growing where the two
    disagree, and the ResponseEvent's text is the one to keep. Call `reset` before the next response.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self._ids: list[int] = []
        self._sent = ""

    @property
    def text(self) -> str:
        """The text handed out so far."""
        return self._sent

    def finish(self, final_text: str) -> str:
        """The rest of the response once it is finished (`ResponseEvent.text`): what was held back (a trailing
        half character the model never completed), or "" when the pieces already add up or disagree with it.
        Resets for the next response."""
        sent = self._sent
        self.reset()
        return final_text[len(sent):] if final_text.startswith(sent) else ""

    def add(self, token_id: int) -> str:
        """The text that token `token_id` completes (often a word with its leading space; may be "")."""
        self._ids.append(int(token_id))
        text = self.tokenizer.decode(self._ids, skip_special_tokens=True).lstrip()
        if text.endswith(_INCOMPLETE):
            return ""
        ready = text.rstrip()
        if len(ready) <= len(self._sent) or not ready.startswith(self._sent):
            return ""
        delta, self._sent = ready[len(self._sent):], ready
        return delta
