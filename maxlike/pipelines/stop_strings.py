"""Stop strings over streamed text: the text ends before the first stop string, which never shows.

A stop string can span several tokens ("\\n\\nUser:" may arrive as "\\n", "\\nUser", ":"), so text
that could be the start of a stop string is held back until the next piece says whether it is one.
"""

from __future__ import annotations

from typing import Sequence


class StopStrings:
    """Feed text pieces in order; each call returns what may be shown now and whether a stop string
    was found (then the request is over and later pieces must not be fed)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held, self.stopped = "", True
            return text[: min(hits)], True
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The text held back, once no more pieces will come (it was no stop string)."""
        out, self._held = self._held, ""
        return out

    def _partial_suffix(self, text: str) -> int:
        """The length of the longest end of `text` that begins some stop string."""
        for k in range(min(len(text), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
