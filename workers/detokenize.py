"""Incremental detokenization: text deltas that are whole UTF-8 characters and never include
text a stop string will later cut.

Each step decodes two short windows per sequence (TGI's prefix/read offsets), all sequences of
the batch in one call into the Rust tokenizer, instead of decoding every sequence in full.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

INCOMPLETE = "\ufffd"  # what the decoder yields for a partial UTF-8 character
# Postgres text cannot hold NUL; a model that emits byte 0 shows it as the symbol for null.
NUL, NUL_SYMBOL = "\x00", "\u2400"


def clean(text: str) -> str:
    return text.replace(NUL, NUL_SYMBOL) if NUL in text else text


@dataclass
class TextState:
    stops: list[str] = field(default_factory=list)
    text: str = ""  # decoded so far, whole characters only
    emitted: int = 0  # characters of `text` already handed out as deltas
    stopped: bool = False  # `text` was cut at a stop string
    _prefix_offset: int = 0
    _read_offset: int = 0

    @property
    def holdback(self) -> int:
        """Characters kept back so that a stop string split across steps is never streamed."""
        return max((len(s) for s in self.stops), default=1) - 1

    def take_delta(self, final: bool) -> str:
        limit = len(self.text) if final else max(self.emitted, len(self.text) - self.holdback)
        delta = self.text[self.emitted : limit]
        self.emitted = limit
        return delta

    def _windows(self, ids: list[int]) -> tuple[list[int], list[int]]:
        return ids[self._prefix_offset : self._read_offset], ids[self._prefix_offset :]

    def _absorb(self, ids: list[int], prefix_text: str, full_text: str) -> None:
        if len(full_text) <= len(prefix_text) or full_text.endswith(INCOMPLETE):
            return  # wait for the rest of the character
        before = len(self.text)
        self.text += clean(full_text[len(prefix_text) :])
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        self._cut_at_stop(search_from=max(0, before - self.holdback))

    def _cut_at_stop(self, search_from: int) -> None:
        cuts = [i for i in (self.text.find(s, search_from) for s in self.stops) if i != -1]
        if cuts:
            self.text = self.text[: min(cuts)]
            self.stopped = True

    def finish(self, full_text: str) -> None:
        """Take the complete decode at the end (it holds any trailing partial character)."""
        full_text = clean(full_text)
        if not self.stopped and full_text.startswith(self.text):
            self.text = full_text


def advance_texts(
    decode_batch: Callable[[list[list[int]]], list[str]],
    items: list[tuple[TextState, list[int]]],
) -> None:
    """Bring every (state, generated ids) pair up to date with one batched decode."""
    if not items:
        return
    windows: list[list[int]] = []
    for state, ids in items:
        windows.extend(state._windows(ids))
    decoded = decode_batch(windows)
    for i, (state, ids) in enumerate(items):
        state._absorb(ids, decoded[2 * i], decoded[2 * i + 1])
