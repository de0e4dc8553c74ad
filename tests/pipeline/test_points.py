"""Point-cloud readers: formats, scan times, non-finite points and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from plyfile import PlyData, PlyElement

from pipeline.errors import NonFinitePoints, PointCloudError, SourceNotFound
from pipeline.sources.points import read_point_scans, read_scan


def cloud(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def write_bin(path: Path, pts: np.ndarray) -> Path:
    pts.astype("<f4").tofile(path)
    return path


def write_ply(path: Path, pts: np.ndarray, *, text: bool, intensity: str | None = "intensity") -> Path:
    fields = [("x", "f4"), ("y", "f4"), ("z", "f4")] + ([(intensity, "f4")] if intensity else [])
    data = np.empty(len(pts), dtype=fields)
    for i, (name, _) in enumerate(fields):
        data[name] = pts[:, i]
    PlyData([PlyElement.describe(data, "vertex")], text=text, byte_order="<").write(str(path))
    return path


def write_pcd(path: Path, pts: np.ndarray, *, data: str, with_rgb: bool = True) -> Path:
    # an extra multi-count field before intensity checks that columns are located by the header
    fields = "x y z rgb normal intensity" if with_rgb else "x y z intensity"
    size = "4 4 4 4 4 4" if with_rgb else "4 4 4 4"
    types = "F F F U F F" if with_rgb else "F F F F"
    count = "1 1 1 1 3 1" if with_rgb else "1 1 1 1"
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\n"
        f"FIELDS {fields}\nSIZE {size}\nTYPE {types}\nCOUNT {count}\n"
        f"WIDTH {len(pts)}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {len(pts)}\nDATA {data}\n"
    )
    if with_rgb:
        rec = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<u4"), ("n", "<f4", (3,)), ("i", "<f4")])
    else:
        rec = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("i", "<f4")])
    table = np.zeros(len(pts), dtype=rec)
    table["x"], table["y"], table["z"], table["i"] = pts[:, 0], pts[:, 1], pts[:, 2], pts[:, 3]
    if with_rgb:
        table["rgb"] = 0xFF00FF
        table["n"] = 0.5
    if data == "ascii":
        lines = []
        for r in table:
            vals = [repr(float(r["x"])), repr(float(r["y"])), repr(float(r["z"]))]
            if with_rgb:
                vals += [str(int(r["rgb"]))] + [repr(float(v)) for v in r["n"]]
            vals.append(repr(float(r["i"])))
            lines.append(" ".join(vals))
        path.write_text(header + "\n".join(lines) + "\n")
    else:
        path.write_bytes(header.encode() + table.tobytes())
    return path


def scans(path, **kw) -> list:
    return list(read_point_scans(path, stream_id="lidar0", **kw))


@pytest.mark.parametrize(
    "writer",
    [
        lambda p, x: write_bin(p / "0.bin", x),
        lambda p, x: write_ply(p / "0.ply", x, text=True),
        lambda p, x: write_ply(p / "0.ply", x, text=False),
        lambda p, x: write_pcd(p / "0.pcd", x, data="ascii"),
        lambda p, x: write_pcd(p / "0.pcd", x, data="binary"),
        lambda p, x: write_pcd(p / "0.pcd", x, data="binary", with_rgb=False),
        lambda p, x: (np.save(p / "0.npy", x), p / "0.npy")[1],
        lambda p, x: (np.savez(p / "0.npz", points=x, other=np.zeros(3)), p / "0.npz")[1],
        lambda p, x: (np.savez(p / "0.npz", x), p / "0.npz")[1],
    ],
    ids=["kitti", "ply-ascii", "ply-binary", "pcd-ascii", "pcd-binary", "pcd-binary-xyzi", "npy", "npz-named", "npz-single"],
)
def test_every_format_round_trips(tmp_path, writer):
    pts = cloud(37)
    path = writer(tmp_path, pts)
    out = read_scan(path)
    assert out.dtype == np.float32 and out.shape == (37, 4)
    np.testing.assert_array_equal(out, pts)


def test_missing_intensity_is_zero_and_extra_columns_dropped(tmp_path):
    pts = cloud(10)
    write_ply(tmp_path / "a.ply", pts, text=True, intensity=None)
    out = read_scan(tmp_path / "a.ply")
    np.testing.assert_array_equal(out[:, :3], pts[:, :3])
    assert (out[:, 3] == 0).all()
    write_ply(tmp_path / "b.ply", pts, text=False, intensity="Reflectance")
    np.testing.assert_array_equal(read_scan(tmp_path / "b.ply")[:, 3], pts[:, 3])
    np.save(tmp_path / "c.npy", np.hstack([pts, np.ones((10, 3), np.float32)]))
    np.testing.assert_array_equal(read_scan(tmp_path / "c.npy"), pts)
    np.save(tmp_path / "d.npy", pts[:, :3].astype(np.float64))
    assert (read_scan(tmp_path / "d.npy")[:, 3] == 0).all()


@settings(max_examples=25, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 50), st.just(4)), elements=st.floats(-1e6, 1e6, width=32)))
def test_pcd_binary_and_kitti_round_trip_any_values(tmp_path_factory, pts):
    d = tmp_path_factory.mktemp("prop")
    np.testing.assert_array_equal(read_scan(write_pcd(d / "a.pcd", pts, data="binary")), pts)
    np.testing.assert_array_equal(read_scan(write_bin(d / "a.bin", pts)), pts)


def test_integer_names_use_the_rate(tmp_path):
    for i in (0, 1, 2, 5):
        write_bin(tmp_path / f"{i:06d}.bin", cloud(4, i))
    (tmp_path / "notes.txt").write_text("ignored")
    out = scans(tmp_path)
    assert [s.t for s in out] == [0.0, 0.1, 0.2, 0.5]
    np.testing.assert_allclose([s.duration for s in out], [0.1, 0.1, 0.3, 0.1])
    np.testing.assert_array_equal(out[3].points, cloud(4, 5))
    assert [s.t for s in scans(tmp_path, rate=20)] == [0.0, 0.05, 0.1, 0.25]


def test_float_names_are_seconds(tmp_path):
    for name in ("12.5", "10.25", "11.0"):
        np.save(tmp_path / f"{name}.npy", cloud(3))
    out = scans(tmp_path)
    assert [s.t for s in out] == [10.25, 11.0, 12.5]
    assert out[-1].duration == pytest.approx(np.median([0.75, 1.5]))


def test_other_names_go_in_sorted_order(tmp_path):
    for name in ("scan_b", "scan_a", "scan_c"):
        np.save(tmp_path / f"{name}.npy", cloud(3))
    assert [s.t for s in scans(tmp_path)] == [0.0, 0.1, 0.2]


def test_sidecar_csv_sets_times_and_selects_files(tmp_path):
    for name in ("a", "b", "c"):
        np.save(tmp_path / f"{name}.npy", cloud(3, ord(name)))
    (tmp_path / "timestamps.csv").write_text("file,t\nb.npy,1.5\na.npy,2.0\nmissing.npy,3\n")
    out = scans(tmp_path)
    assert [s.t for s in out] == [1.5, 2.0]
    np.testing.assert_array_equal(out[0].points, cloud(3, ord("b")))
    (tmp_path / "timestamps.csv").write_text("file,t\n")  # a header alone lists nothing
    with pytest.raises(PointCloudError, match="no scan files .* listed in timestamps.csv"):
        scans(tmp_path)
    (tmp_path / "timestamps.csv").write_text("file,t\na.npy,oops\n")
    with pytest.raises(PointCloudError, match="line 2: time 'oops' is not a number"):
        scans(tmp_path)


def test_single_file_uses_its_name_and_sidecar(tmp_path):
    write_bin(tmp_path / "000007.bin", cloud(5))
    (out,) = scans(tmp_path / "000007.bin")
    assert out.t == pytest.approx(0.7) and out.duration == pytest.approx(0.1)


def test_non_finite_points_are_dropped_and_reported(tmp_path):
    pts = cloud(20)
    pts[3, 0] = np.nan
    pts[7, 2] = np.inf
    pts[8, 3] = -np.inf
    write_bin(tmp_path / "000000.bin", pts)
    write_bin(tmp_path / "000001.bin", cloud(5))
    errors = []
    out = scans(tmp_path, on_error=errors.append)
    assert len(out[0].points) == 17 and np.isfinite(out[0].points).all()
    np.testing.assert_array_equal(out[0].points, np.delete(pts, [3, 7, 8], axis=0))
    assert len(errors) == 1 and isinstance(errors[0], NonFinitePoints)
    assert errors[0].count == 3 and errors[0].stream_id == "lidar0"
    assert "000000.bin" in str(errors[0]) and "lidar0" in str(errors[0]) and "3 non-finite" in str(errors[0])
    # without a callback the points are still dropped
    assert len(scans(tmp_path)[0].points) == 17


def test_bad_and_empty_scans_in_a_folder_are_reported_and_skipped(tmp_path):
    write_bin(tmp_path / "000000.bin", cloud(5))
    (tmp_path / "000001.bin").write_bytes(b"\0" * 20)  # not a multiple of 16
    (tmp_path / "000002.bin").write_bytes(b"")  # empty scan
    write_bin(tmp_path / "000003.bin", np.full((4, 4), np.nan, np.float32))  # nothing finite
    (tmp_path / "000004.ply").write_bytes(b"not a ply")
    write_bin(tmp_path / "000005.bin", cloud(5))
    errors = []
    out = scans(tmp_path, on_error=errors.append)
    assert [round(s.t, 3) for s in out] == [0.0, 0.5]
    kinds = [(e.kind, Path(e.source).name) for e in errors]
    assert kinds == [
        ("PointCloudError", "000001.bin"),
        ("PointCloudError", "000002.bin"),
        ("NonFinitePoints", "000003.bin"),
        ("PointCloudError", "000003.bin"),
        ("PointCloudError", "000004.ply"),
    ]
    assert "multiple of 16" in str(errors[0]) and "empty scan" in str(errors[1])


def test_a_bad_only_scan_raises(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\0" * 17)
    with pytest.raises(PointCloudError, match=r"stream 'lidar0'.*a\.bin.*17 bytes is not a multiple of 16"):
        scans(tmp_path / "a.bin")
    (tmp_path / "e.bin").write_bytes(b"")
    with pytest.raises(PointCloudError, match="empty scan"):
        scans(tmp_path / "e.bin")


def test_all_scans_bad_raises_after_reporting(tmp_path):
    (tmp_path / "000000.bin").write_bytes(b"\0" * 3)
    (tmp_path / "000001.bin").write_bytes(b"")
    errors = []
    with pytest.raises(PointCloudError, match="none of the 2 scans"):
        scans(tmp_path, on_error=errors.append)
    assert len(errors) == 2


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("a.ply", b"", "malformed PLY"),
        ("a.pcd", b"VERSION 0.7\nFIELDS x y\n", "no DATA line"),
        ("a.pcd", b"FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nPOINTS 5\nDATA binary\n" + b"\0" * 12,
         "truncated"),
        ("a.pcd", b"FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nPOINTS 1\nDATA binary_compressed\n",
         "binary_compressed"),
        ("a.pcd", b"FIELDS x y\nSIZE 4 4\nTYPE F F\nCOUNT 1 1\nPOINTS 1\nDATA ascii\n1 2\n", "no field z"),
        ("a.pcd", b"FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nPOINTS 2\nDATA ascii\n1 2 3\n", "promises 2"),
        ("a.npy", b"", "not a readable numpy file"),
        ("a.npz", b"garbage", "not a readable numpy file"),
    ],
)
def test_malformed_files_name_the_cause(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(PointCloudError, match=match) as ei:
        scans(tmp_path / name)
    assert ei.value.stream_id == "lidar0" and ei.value.source == str(tmp_path / name)


def test_wrong_array_shapes_and_ambiguous_npz(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((5, 2)))
    with pytest.raises(PointCloudError, match="C >= 3"):
        read_scan(tmp_path / "a.npy")
    np.savez(tmp_path / "b.npz", a=np.zeros((5, 3)), b=np.zeros((5, 3)))
    with pytest.raises(PointCloudError, match="name the scan array 'points'"):
        read_scan(tmp_path / "b.npz")


def test_missing_path_empty_folder_and_unknown_suffix(tmp_path):
    with pytest.raises(SourceNotFound, match="does not exist"):
        scans(tmp_path / "nope")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(PointCloudError, match="no scan files"):
        scans(tmp_path)
    with pytest.raises(PointCloudError, match="unknown point-cloud format '.txt'"):
        scans(tmp_path / "readme.txt")
