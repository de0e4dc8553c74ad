"""The commit manifest of one stream: what is committed, published and retired.

Stored as immutable numbered objects under ``_manifest/stream_id=<id>/`` (one whole-object write
each, atomic on a local disk and on an object store alike; nothing is ever appended):

- ``r<seq>.json``: one record: a commit (``parts``: hidden part files with their table, media-time
  period, row count and window ids), a merge of hidden parts into one (``parts``, ``into``), a
  publication (``period``, the visible ``files`` written and the ``parts`` they replace) or a
  retirement (``period``: its published files are deleted);
- ``s<seq>.json``: a snapshot, the whole `StreamState` after record ``seq``: one entry per period
  (its window-id range, published files, whether retired) and the unpublished parts.

A stream's state is its latest snapshot plus the records after it. Compaction writes a new
snapshot, then deletes the objects it covers; a crash in between leaves both, and the covered
ones are ignored. Window ids are kept as ranges (`IdSet`), so a stream's state stays small
however long it runs.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pipeline.errors import OutputError
from pipeline.outputfs import OutputFS

MANIFEST_DIR = "_manifest"
KEYED_TABLES = ("windows", "flow", "student")  # tables unique on window_id
_OBJECT = re.compile(r"^([rs])(\d{10})\.json$")


class IdSet:
    """A set of non-negative ints stored as sorted, disjoint, inclusive ``[lo, hi]`` ranges."""

    def __init__(self, ranges: Iterable[Iterable[int]] = ()) -> None:
        self._ranges: list[list[int]] = _merge([list(r) for r in ranges])

    def add(self, ids: Iterable[int]) -> None:
        """Add ``ids``."""
        self._ranges = _merge(self._ranges + _to_ranges(ids))

    def __contains__(self, k: object) -> bool:
        i = bisect.bisect_right(self._ranges, [k, float("inf")]) - 1  # type: ignore[list-item]
        return i >= 0 and self._ranges[i][0] <= k <= self._ranges[i][1]  # type: ignore[operator]

    def __iter__(self) -> Iterator[int]:
        for lo, hi in self._ranges:
            yield from range(lo, hi + 1)

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self._ranges)

    def first_missing(self) -> int:
        """The lowest id >= 0 not in the set."""
        return self._ranges[0][1] + 1 if self._ranges and self._ranges[0][0] <= 0 else 0

    def ranges(self) -> list[list[int]]:
        """The ranges, as JSON stores them."""
        return [list(r) for r in self._ranges]


def _to_ranges(ids: Iterable[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for k in sorted(set(ids)):
        if out and k == out[-1][1] + 1:
            out[-1][1] = k
        else:
            out.append([k, k])
    return out


def _merge(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


@dataclass
class Part:
    """A committed, unpublished part file (hidden): its table, period and rows."""

    path: str
    table: str
    period: int
    rows: int
    ids: list[list[int]] | None = None  # window-id ranges (keyed tables)
    level: int = 0  # 0: written by a commit; n + 1: merged from parts of level n


@dataclass
class Period:
    """One period of media time: its ``windows`` id range, its published files (``{table, path,
    rows}``, one list per publication) and whether retention deleted them."""

    ids: list[int] | None = None
    pieces: list[list[dict]] = field(default_factory=list)
    retired: bool = False


@dataclass
class StreamState:
    """What the manifest says of one stream (see the module docstring)."""

    seq: int = -1  # the last record applied
    every_s: float | None = None  # publish_every_s, fixed by the stream's first commit
    committed: dict[str, IdSet] = field(default_factory=lambda: {t: IdSet() for t in KEYED_TABLES})
    t_max: float | None = None  # the latest committed window's t_start (media seconds)
    periods: dict[int, Period] = field(default_factory=dict)
    parts: list[Part] = field(default_factory=list)

    def apply(self, rec: dict) -> None:
        """Apply one record (``seq`` must follow the last one)."""
        kind = rec["kind"]
        if kind == "commit":
            for p in rec["parts"]:
                part = Part(**p)
                self.parts.append(part)
                if part.ids is not None:
                    self.committed[part.table].add(IdSet(part.ids))
                    if part.table == "windows":
                        per = self.periods.setdefault(part.period, Period())
                        lo, hi = part.ids[0][0], part.ids[-1][1]
                        per.ids = [lo, hi] if per.ids is None else [min(per.ids[0], lo), max(per.ids[1], hi)]
            if self.every_s is None:
                self.every_s = rec["every_s"]
            if rec.get("t_max") is not None:
                self.t_max = max(rec["t_max"], self.t_max if self.t_max is not None else rec["t_max"])
        elif kind == "merge":
            gone = set(rec["parts"])
            at = next(i for i, p in enumerate(self.parts) if p.path in gone)
            self.parts = [p for p in self.parts if p.path not in gone]
            self.parts.insert(at, Part(**rec["into"]))
        elif kind == "publish":
            gone = set(rec["parts"])
            self.parts = [p for p in self.parts if p.path not in gone]
            self.periods.setdefault(rec["period"], Period()).pieces.append(rec["files"])
        elif kind == "retire":
            self.periods.setdefault(rec["period"], Period()).retired = True
        else:
            raise ValueError(f"unknown manifest record kind {kind!r}")
        self.seq = rec["seq"]

    # -- queries ---------------------------------------------------------------------------
    def unpublished(self, period: int) -> list[Part]:
        """The parts of ``period`` not yet published, in commit order."""
        return [p for p in self.parts if p.period == period]

    def published(self, table: str | None = None) -> list[dict]:
        """The published files (``{table, path, rows}``) of periods not retired."""
        return [f for per in self.periods.values() if not per.retired for piece in per.pieces for f in piece
                if table is None or f["table"] == table]

    def retired_files(self) -> list[dict]:
        """The files of retired periods (deleted, or to delete after a crash)."""
        return [f for per in self.periods.values() if per.retired for piece in per.pieces for f in piece]

    def period_of_id(self, window_id: int, default: int) -> int:
        """The period holding ``windows`` row ``window_id`` (by id range: ids grow with media time);
        for an id no period covers, the period of the nearest lower committed id, else ``default``."""
        for k, per in sorted(self.periods.items(), reverse=True):  # a late row is usually of a recent period
            if per.ids is not None and per.ids[0] <= window_id:
                return k
        return default

    # -- JSON ------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "seq": self.seq,
            "every_s": self.every_s,
            "committed": {t: s.ranges() for t, s in self.committed.items()},
            "t_max": self.t_max,
            "periods": {str(k): {"ids": p.ids, "pieces": p.pieces, "retired": p.retired} for k, p in self.periods.items()},
            "parts": [vars(p) for p in self.parts],
        }

    @classmethod
    def from_json(cls, d: dict) -> "StreamState":
        return cls(
            seq=d["seq"],
            every_s=d["every_s"],
            committed={t: IdSet(d["committed"].get(t, [])) for t in KEYED_TABLES},
            t_max=d["t_max"],
            periods={int(k): Period(**p) for k, p in d["periods"].items()},
            parts=[Part(**p) for p in d["parts"]],
        )


class ManifestStore:
    """Reads and writes one stream's manifest objects in an output folder."""

    def __init__(self, out: OutputFS, stream_id: str) -> None:
        self.out = out
        self.folder = f"{MANIFEST_DIR}/stream_id={stream_id}"
        self._objects: list[str] = []  # the objects a compaction may delete

    def load(self, *, tidy: bool = True) -> StreamState:
        """The stream's state (empty for a new stream); with ``tidy`` (the writer, which owns the
        folder) leftover temporary objects are deleted."""
        snapshots, records = {}, {}
        self._objects = []
        for rel in self.out.files(self.folder):
            m = _OBJECT.match(rel.rpartition("/")[2])
            if m is None:
                if tidy:
                    self.out.delete(rel)  # a temporary object of a write that did not finish
                continue
            (snapshots if m.group(1) == "s" else records)[int(m.group(2))] = rel
            self._objects.append(rel)
        state = StreamState()
        if snapshots:
            last = max(snapshots)
            state = StreamState.from_json(self._read(snapshots[last]))
        for seq in sorted(k for k in records if k > state.seq):
            rec = self._read(records[seq])
            if seq != state.seq + 1:
                raise OutputError(f"manifest record {seq} follows {state.seq}: records are missing",
                                  source=self.out.where + "/" + self.folder)
            state.apply(rec)
        return state

    def append(self, state: StreamState, rec: dict) -> None:
        """Write ``rec`` as the next record, then apply it to ``state`` (unchanged if the write fails)."""
        rec = {"seq": state.seq + 1, **rec}
        rel = f"{self.folder}/r{rec['seq']:010d}.json"
        self.out.write_bytes(rel, json.dumps(rec, separators=(",", ":")).encode())
        self._objects.append(rel)
        state.apply(rec)

    @property
    def records(self) -> int:
        """Objects a compaction would replace."""
        return len(self._objects)

    def compact(self, state: StreamState) -> None:
        """Replace the stream's objects by one snapshot of ``state``."""
        rel = f"{self.folder}/s{state.seq:010d}.json"
        self.out.write_bytes(rel, json.dumps(state.to_json(), separators=(",", ":")).encode())
        for old in self._objects:
            if old != rel:
                self.out.delete(old)
        self._objects = [rel]

    def _read(self, rel: str) -> dict:
        try:
            return json.loads(self.out.read_bytes(rel))
        except ValueError:
            raise OutputError(f"manifest object {rel} is corrupt", source=self.out.where) from None


def stream_ids(out: OutputFS) -> list[str]:
    """The streams that have a manifest in the output folder."""
    ids = set()
    for rel in out.files(MANIFEST_DIR):
        parts = rel.split("/")
        if len(parts) == 3 and parts[1].startswith("stream_id="):
            ids.add(parts[1][len("stream_id=") :])
    return sorted(ids)


def old_manifests(out: OutputFS) -> list[str]:
    """Manifests of the earlier layout (one ``.jsonl`` per stream), which this version cannot resume."""
    return [rel for rel in out.files(MANIFEST_DIR) if rel.endswith(".jsonl")]
