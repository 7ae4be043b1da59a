"""Token ids to text for one reply as it streams: stop strings, and holding back what may still change.

    t = ReplyText(tokenizer, stop=["\\n\\n"], hold=moderator.holdback)
    piece = t.add(token_id)     # the text that is now safe to send ("" while it is held back)
    t.stopped                   # a stop string appeared: the reply ends before it
    rest = t.finish()           # at the end, whatever was held back

Held back, because sending it could be wrong a token later: a byte sequence not yet a whole character (decodes to
U+FFFD), the start of a stop string (OpenAI's API never sends any of the stop string), and, when the reply is being
moderated, what the moderator asks to hold (`hold(text)` -> how many trailing characters): the start of a phrase
it would flag, or the word still being written (a word already sent cannot be taken back). The reply is decoded whole
each time: replies are short, and decoding pieces separately gets the spaces of byte-level BPE wrong.
"""

from __future__ import annotations

from typing import Callable, Optional


def partial_word(text: str) -> int:
    """A `hold` for ReplyText: the word still being written (everything after the last whitespace)."""
    cut = max(text.rfind(c) for c in " \n\t")
    return len(text) - (cut + 1)


class ReplyText:
    def __init__(self, tokenizer, stop: list[str] | tuple = (), hold: Optional[Callable[[str], int]] = None):
        self.tok = tokenizer
        # The Rust tokenizer directly where transformers' decode would add nothing to it (no clean-up of spaces):
        # its wrapper costs more than the decoding, and this runs once per token.
        fast = getattr(tokenizer, "backend_tokenizer", None)
        self.rust = fast if not getattr(tokenizer, "clean_up_tokenization_spaces", False) else None
        self.stops = [s for s in stop if s]
        self.hold = hold
        self.ids: list[int] = []
        self.sent = ""  # what has gone out so far
        self.stopped = False  # a stop string was found; no more text will come

    def _decoded(self) -> str:
        text = (self.rust or self.tok).decode(self.ids, skip_special_tokens=True)
        return text.lstrip()

    def _cut_at_stop(self, text: str) -> str:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return text[: min(hits)]
        return text

    def _safe_end(self, text: str) -> int:
        """How much of `text` can be sent now."""
        end = len(text)
        while end and text[end - 1] == "\ufffd":
            end -= 1
        for s in self.stops:  # the longest tail that could still grow into a stop string
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[end - k : end] == s[:k]:
                    end -= k
                    break
        if self.hold is not None:
            end -= min(end, self.hold(text[:end]))
        return end

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self._cut_at_stop(self._decoded())
        end = len(text) if self.stopped else self._safe_end(text)
        return self._release(text[:end])

    def finish(self) -> str:
        """The end of the reply: everything still held (but never a stop string, nor a broken character)."""
        if self.stopped:
            return ""
        text = self._cut_at_stop(self._decoded()).rstrip("\ufffd").rstrip()
        return self._release(text)

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.sent):
            return ""
        # What was sent stays sent: should a later token change how earlier ones decode, only the tail goes out.
        piece, self.sent = upto[len(self.sent) :], self.sent + upto[len(self.sent) :]
        return piece
