"""A batch: entries read together (by the reader or the reclaimer), written together and
acknowledged together."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .redisio import Entry


@dataclass(slots=True)
class Batch:
    """Entries read together, written together and acknowledged together."""

    entries: list[Entry]
    #: Payload bytes of the entries, counted against the memory budget until settled.
    nbytes: int = 0

    @property
    def stream(self) -> str:
        """The shard the batch came from (a reader or reclaimer reads one stream only)."""
        return self.entries[0].stream


def count_by_stream(entries: Sequence[Entry]) -> dict[str, int]:
    """How many of ``entries`` came from each stream."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.stream] = counts.get(e.stream, 0) + 1
    return counts
