"""Stop strings over a stream of tokens: the text released as tokens arrive, cut before the first stop
string, the tail that could begin one held back (docs/inference.md §8).
"""

from __future__ import annotations

from ..core.tokenizer import Tokenizer


class TextStream:
    """The text of one sequence as its tokens arrive, cut at the first stop string (see the module)."""

    def __init__(self, tok: Tokenizer, stops: list[str], stop_ids: frozenset[int]):
        self.decoder, self.stops, self.stop_ids = tok.stream_decoder(), stops, stop_ids
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, token: int) -> str:
        """The text that can be released after `token` ('' while it may still begin a stop string)."""
        if token in self.stop_ids or self.stopped:
            return ""
        self.text += self.decoder.push(token)
        return self._release(final=False)

    def finish(self) -> str:
        """What is left once the row has ended."""
        if not self.stopped:
            self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stops and not self.stopped:
            start = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.stopped, final = self.text[:min(hits)], True, True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out
