"""Point-cloud scans from files: KITTI ``.bin``, PLY, PCD, ``.npy`` / ``.npz``.

A source is one scan file or a folder of them (files with the suffixes in `SCAN_SUFFIXES`,
other files ignored). Every scan comes out as ``N x 4`` float32 ``(x, y, z, intensity)``:

- ``.bin``: KITTI velodyne layout, consecutive float32 ``x, y, z, intensity`` records (the file
  size must be a multiple of 16 bytes);
- ``.ply``: the ``vertex`` element's ``x, y, z`` and, if present, its intensity property
  (``intensity``, ``reflectance``, ``remission`` or ``scalar_intensity``); ascii or binary;
- ``.pcd``: fields ``x, y, z`` and the intensity field under one of the same names; ``DATA ascii``
  or ``binary`` (``binary_compressed`` is refused with a message);
- ``.npy``: an ``N x C`` array, ``C >= 3``; ``.npz``: the array under ``points``, or its only array.
  Columns past the fourth are dropped.

Files without intensity get intensity 0.

**Scan times.** In this order of precedence:

1. a ``timestamps.csv`` beside the scans (in the folder, or beside a single file): rows
   ``file,t`` (t in seconds; a header row is allowed); only files it lists are read;
2. file names whose stem is a decimal number with a fraction (``12.345.bin``): that many seconds;
3. file names whose stem is an integer (``000123.bin``, KITTI): ``index / rate`` with ``rate``
   scans per second (default `DEFAULT_RATE` = 10, KITTI's lidar);
4. any other names: in sorted name order, ``position / rate``.

Rules 2-4 apply to the folder as a whole (all stems integers, else all numbers, else order), so
times never mix conventions. A scan's duration is the gap to the next scan; the last scan gets
the median gap (``1 / rate`` for a single scan).

**Bad scans.** Non-finite points are dropped and counted, and a `NonFinitePoints` is reported
through ``on_error``. In a folder, a malformed or empty scan (no finite point left) is reported
as a `PointCloudError` and skipped, so one bad file does not end a long recording; a source
whose only scan is bad, or whose scans are all bad, raises it. With ``on_error=None`` reports
are dropped (the data they describe is still removed).
"""

from __future__ import annotations

import csv
import math
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from plyfile import PlyData, PlyParseError

from pipeline.errors import NonFinitePoints, PipelineError, PointCloudError, SourceNotFound
from pipeline.sources.base import PointScan

SCAN_SUFFIXES = (".bin", ".ply", ".pcd", ".npy", ".npz")
DEFAULT_RATE = 10.0
TIMESTAMPS_FILE = "timestamps.csv"
_INTENSITY_NAMES = ("intensity", "reflectance", "remission", "scalar_intensity", "i")
_INT_STEM = re.compile(r"^\d+$")
_FLOAT_STEM = re.compile(r"^\d+\.\d*$|^\d*\.\d+$")


def read_point_scans(
    path: str | Path,
    *,
    stream_id: str,
    on_error: Callable[[PipelineError], None] | None = None,
    rate: float = DEFAULT_RATE,
) -> Iterator[PointScan]:
    """Scans of one file or folder in time order (see the module docstring for times and errors).

    The file list and times are read at once (missing path, bad ``timestamps.csv`` and an empty
    folder raise here); scans are read lazily as the iterator advances.
    """
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate!r}")
    entries = scan_times(path, stream_id=stream_id, rate=rate)
    return _iter_scans(entries, stream_id=stream_id, on_error=on_error, rate=rate)


def scan_times(path: str | Path, *, stream_id: str, rate: float = DEFAULT_RATE) -> list[tuple[Path, float]]:
    """``(file, t)`` of every scan of a file or folder, sorted by time."""
    path = Path(path)
    if not path.exists():
        raise SourceNotFound("point-cloud path does not exist", stream_id=stream_id, source=str(path))
    if path.is_dir():
        folder = path
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SCAN_SUFFIXES)
    else:
        if path.suffix.lower() not in SCAN_SUFFIXES:
            raise PointCloudError(
                f"unknown point-cloud format {path.suffix!r}; expected one of {', '.join(SCAN_SUFFIXES)}",
                stream_id=stream_id,
                source=str(path),
            )
        folder, files = path.parent, [path]
    sidecar = folder / TIMESTAMPS_FILE
    if sidecar.is_file():
        listed = _read_sidecar(sidecar, stream_id=stream_id)
        wanted = {f.name for f in files}
        entries = [(folder / name, t) for name, t in listed if name in wanted]
    elif all(_INT_STEM.match(f.stem) for f in files):
        entries = [(f, int(f.stem) / rate) for f in files]
    elif all(_INT_STEM.match(f.stem) or _FLOAT_STEM.match(f.stem) for f in files):
        entries = [(f, float(f.stem)) for f in files]
    else:
        entries = [(f, i / rate) for i, f in enumerate(files)]
    if not entries:
        raise PointCloudError(
            f"no scan files ({', '.join(SCAN_SUFFIXES)})"
            + (f" listed in {TIMESTAMPS_FILE}" if sidecar.is_file() else ""),
            stream_id=stream_id,
            source=str(path),
        )
    return sorted(entries, key=lambda e: (e[1], e[0].name))


def _read_sidecar(path: Path, *, stream_id: str) -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    with path.open(newline="") as fh:
        for n, row in enumerate(csv.reader(fh), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise PointCloudError(
                    f"line {n}: expected 'file,t', got {row!r}", stream_id=stream_id, source=str(path)
                )
            name, t = row[0].strip(), row[1].strip()
            try:
                value = float(t)
            except ValueError:
                if n == 1:  # a header row
                    continue
                raise PointCloudError(
                    f"line {n}: time {t!r} is not a number", stream_id=stream_id, source=str(path)
                ) from None
            if not math.isfinite(value):
                raise PointCloudError(f"line {n}: time {t!r} is not finite", stream_id=stream_id, source=str(path))
            rows.append((Path(name).name, value))
    return rows


def _iter_scans(
    entries: list[tuple[Path, float]],
    *,
    stream_id: str,
    on_error: Callable[[PipelineError], None] | None,
    rate: float,
) -> Iterator[PointScan]:
    times = np.array([t for _, t in entries], dtype=np.float64)
    gaps = np.diff(times)
    last_gap = float(np.median(gaps)) if len(gaps) and np.median(gaps) > 0 else 1.0 / rate
    durations = np.append(gaps, last_gap)
    only = len(entries) == 1

    def problem(error: PointCloudError) -> None:
        if only:
            raise error
        if on_error is not None:
            on_error(error)

    yielded = 0
    for (file, t), duration in zip(entries, durations):
        try:
            points = read_scan(file, stream_id=stream_id)
        except PointCloudError as e:
            problem(e)
            continue
        finite = np.isfinite(points).all(axis=1)
        dropped = int(len(points) - finite.sum())
        if dropped:
            points = points[finite]
            if on_error is not None:
                on_error(
                    NonFinitePoints(
                        f"dropped {dropped} non-finite point(s) of {dropped + len(points)}",
                        count=dropped,
                        stream_id=stream_id,
                        source=str(file),
                    )
                )
        if len(points) == 0:
            problem(PointCloudError("empty scan (no finite points)", stream_id=stream_id, source=str(file)))
            continue
        yielded += 1
        yield PointScan(t=float(t), duration=float(duration), points=points)
    if yielded == 0 and not only:
        raise PointCloudError(
            f"none of the {len(entries)} scans could be read", stream_id=stream_id, source=str(entries[0][0].parent)
        )


def read_scan(path: str | Path, *, stream_id: str | None = None) -> np.ndarray:
    """One scan file as ``N x 4`` float32 ``(x, y, z, intensity)``, non-finite points kept.

    Raises `PointCloudError` for a malformed or unreadable file.
    """
    path = Path(path)
    suffix = path.suffix.lower()

    def fail(cause: str) -> PointCloudError:
        return PointCloudError(cause, stream_id=stream_id, source=str(path))

    try:
        if suffix == ".bin":
            size = path.stat().st_size
            if size % 16:
                raise fail(f"KITTI .bin size {size} bytes is not a multiple of 16 (4 float32 per point)")
            return np.fromfile(path, dtype="<f4").reshape(-1, 4)
        if suffix == ".ply":
            return _read_ply(path, fail)
        if suffix == ".pcd":
            return _read_pcd(path, fail)
        if suffix in (".npy", ".npz"):
            return _read_numpy(path, fail)
    except PointCloudError:
        raise
    except OSError as e:
        raise fail(f"cannot read: {e.strerror or e}") from None
    raise fail(f"unknown point-cloud format {suffix!r}")


def _columns(xyz: list[np.ndarray], intensity: np.ndarray | None) -> np.ndarray:
    n = len(xyz[0])
    out = np.zeros((n, 4), dtype=np.float32)
    for i, col in enumerate(xyz):
        out[:, i] = col
    if intensity is not None:
        out[:, 3] = intensity
    return out


def _pick_intensity(names: list[str]) -> str | None:
    lower = {n.lower(): n for n in names}
    return next((lower[k] for k in _INTENSITY_NAMES if k in lower), None)


def _read_ply(path: Path, fail: Callable[[str], PointCloudError]) -> np.ndarray:
    try:
        ply = PlyData.read(str(path))
    except (PlyParseError, ValueError, EOFError, IndexError, KeyError) as e:
        raise fail(f"malformed PLY: {' '.join(str(e).split()) or type(e).__name__}") from None
    if "vertex" not in ply:
        raise fail("PLY file has no 'vertex' element")
    vertex = ply["vertex"].data
    names = list(vertex.dtype.names or ())
    missing = [c for c in "xyz" if c not in names]
    if missing:
        raise fail(f"PLY vertex element lacks {'/'.join(missing)}")
    inten = _pick_intensity([n for n in names if n not in "xyz"])
    return _columns([vertex[c] for c in "xyz"], None if inten is None else vertex[inten])


_PCD_TYPES = {("F", 4): "f4", ("F", 8): "f8", ("I", 1): "i1", ("I", 2): "i2", ("I", 4): "i4", ("I", 8): "i8",
              ("U", 1): "u1", ("U", 2): "u2", ("U", 4): "u4", ("U", 8): "u8"}  # fmt: skip


def _read_pcd(path: Path, fail: Callable[[str], PointCloudError]) -> np.ndarray:
    raw = path.read_bytes()
    header: dict[str, list[str]] = {}
    offset = 0
    while "DATA" not in header:
        end = raw.find(b"\n", offset)
        if end < 0:
            raise fail("malformed PCD: header has no DATA line")
        line = raw[offset:end].decode("ascii", errors="replace").strip()
        offset = end + 1
        if not line or line.startswith("#"):
            continue
        key, *values = line.split()
        header[key.upper()] = values
    try:
        fields = header["FIELDS"]
        sizes = [int(s) for s in header["SIZE"]]
        types = [t.upper() for t in header["TYPE"]]
        counts = [int(c) for c in header.get("COUNT", ["1"] * len(fields))]
        n = int(header["POINTS"][0]) if "POINTS" in header else int(header["WIDTH"][0]) * int(header["HEIGHT"][0])
    except (KeyError, IndexError, ValueError):
        raise fail("malformed PCD header: needs FIELDS, SIZE, TYPE and POINTS (or WIDTH/HEIGHT)") from None
    if not len(fields) == len(sizes) == len(types) == len(counts):
        raise fail("malformed PCD header: FIELDS, SIZE, TYPE and COUNT differ in length")
    missing = [c for c in "xyz" if c not in fields]
    if missing:
        raise fail(f"PCD has no field {'/'.join(missing)}")
    kind = header["DATA"][0].lower() if header["DATA"] else ""
    inten = _pick_intensity([f for f in fields if f not in "xyz"])
    # column of each field's first element in a flattened row
    starts = dict(zip(fields, np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)))
    if kind == "ascii":
        text = raw[offset:].decode("ascii", errors="replace").split()
        width = sum(counts)
        if len(text) < n * width:
            raise fail(f"PCD ascii data has {len(text)} values, header promises {n} points x {width}")
        try:
            table = np.array(text[: n * width], dtype=np.float64).reshape(n, width)
        except ValueError:
            raise fail("PCD ascii data holds a value that is not a number") from None
        cols = {f: table[:, starts[f]] for f in fields}
    elif kind == "binary":
        try:
            dtype = np.dtype([(f, "<" + _PCD_TYPES[(t, s)], (c,)) for f, s, t, c in zip(fields, sizes, types, counts)])
        except KeyError:
            raise fail(f"PCD field types {types} with sizes {sizes} are not supported") from None
        if len(raw) - offset < n * dtype.itemsize:
            raise fail(f"PCD binary data is truncated: {len(raw) - offset} bytes for {n} points of {dtype.itemsize}")
        data = np.frombuffer(raw, dtype=dtype, count=n, offset=offset)
        cols = {f: data[f][:, 0] for f in fields}
    else:
        raise fail(f"PCD DATA {kind!r} is not supported (use ascii or binary)")
    return _columns([cols[c] for c in "xyz"], None if inten is None else cols[inten])


def _read_numpy(path: Path, fail: Callable[[str], PointCloudError]) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile) as e:
        raise fail(f"not a readable numpy file: {' '.join(str(e).split())}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            if "points" in keys:
                arr = loaded["points"]
            elif len(keys) == 1:
                arr = loaded[keys[0]]
            else:
                raise fail(f".npz holds {keys}; name the scan array 'points'")
    else:
        arr = loaded
    if arr.ndim != 2 or arr.shape[1] < 3 or not np.issubdtype(arr.dtype, np.number):
        raise fail(f"expected an N x C numeric array with C >= 3, got shape {arr.shape} {arr.dtype}")
    return _columns([arr[:, 0], arr[:, 1], arr[:, 2]], arr[:, 3] if arr.shape[1] > 3 else None)
