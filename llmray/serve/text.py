"""A row's generated text, decoded token by token as it streams: what is final goes out at once, while a partial
UTF-8 sequence and a tail that could still become a stop string are held back."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class TextStream:
    def __init__(self, backend, stop_strings: tuple[str, ...]):
        """`backend`: the Rust tokenizer; `stop_strings`: the request's stop sequences."""
        self.backend, self.stop_strings = backend, stop_strings
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.decoded = ""  # text decoded so far (may run ahead of `sent`)
        self.sent = ""  # text already handed out
        self.stop_at: int | None = None  # where the first stop string (in the request's order) begins

    def add(self, token: int) -> bool:
        """Decode one more token; True when a stop string now ends the text."""
        piece = self.decoder.step(self.backend, token)  # incremental: None while a UTF-8 sequence is incomplete
        if piece:
            self.decoded += piece
        self.stop_at = next((at for stop in self.stop_strings if (at := self.decoded.find(stop)) != -1), None)
        return self.stop_at is not None

    def until_stop(self) -> str:
        """The text before the stop string, not yet handed out."""
        return self._release(self.decoded[:self.stop_at])

    def safe(self) -> str:
        """The text that can no longer change, not yet handed out: a partial UTF-8 sequence, and a tail that could
        still become a stop string, wait."""
        text = self.decoded
        safe = len(text.rstrip("\ufffd"))
        for stop in self.stop_strings:
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[safe - k:safe] == stop[:k]:
                    safe -= k
                    break
        return self._release(text[:safe])

    def complete(self, whole: str) -> str:
        """At the end: the rest of `whole`, the full decode (a cut mid-character ends in U+FFFD, as a full decode
        would)."""
        return self._release(whole)

    def _release(self, text: str) -> str:
        if len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
