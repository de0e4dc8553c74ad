"""One pass over a container, one iterator per modality: records of the other kinds wait in a
queue until their iterator asks; a broadcast record (a `SourceBreak`) goes to every iterator; an
error is raised by each iterator once its queue is drained."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

from pipeline.sources.base import VideoFrame


class Tee:
    """Splits one iterator of records into one iterator per kind (see `MediaReader.tracks`).

    ``broadcast`` is the record type every iterator receives (`SourceBreak`).
    """

    def __init__(self, records: Iterator[Any], kinds: list[str], broadcast: type) -> None:
        self._records = records
        self._broadcast = broadcast
        self._queues: dict[str, deque] = {k: deque() for k in kinds}
        self._done = False
        self._error: BaseException | None = None

    def iterators(self) -> dict[str, Iterator[Any]]:
        return {k: self._iter(k) for k in self._queues}

    def _iter(self, kind: str) -> Iterator[Any]:
        queue = self._queues[kind]
        while True:
            while not queue:
                if self._error is not None:
                    raise self._error
                if self._done:
                    return
                try:
                    record = next(self._records)
                except StopIteration:
                    self._done = True
                    continue
                except BaseException as e:
                    self._error = e
                    raise
                if isinstance(record, self._broadcast):
                    for q in self._queues.values():
                        q.append(record)
                else:
                    self._queues[kind_of(record)].append(record)
            yield queue.popleft()


def kind_of(record: Any) -> str:
    return "video" if isinstance(record, VideoFrame) else "audio"


__all__ = ["Tee", "kind_of"]
