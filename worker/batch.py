"""A batch: entries read together (by the reader or the reclaimer), written together and
acknowledged together."""

from __future__ import annotations

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

