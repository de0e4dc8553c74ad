"""Where outputs go: a `pyarrow.fs.FileSystem` and a base path, a local folder or an object store.

`open_output(dir)` takes a local path or a URI: ``s3://bucket/prefix`` (endpoint, region and
credentials from the environment: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``),
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` as the AWS SDK reads
them; a URI with ``?endpoint_override=...`` options is left to pyarrow; a password in the URI is
refused), ``gs://``, ``hdfs://`` and any other scheme `pyarrow.fs.FileSystem.from_uri` knows. Every
file the writer touches goes through `OutputFS`, so one commit protocol serves them all.

**Atomic files.** `OutputFS.write_atomic` writes under a hidden temporary name (``.<name>.tmp``,
which no reader of the tables opens) and then moves it to its final name: a rename on a local
disk, a server-side copy and delete on an object store (the final object appears whole or not at
all). A failure removes the temporary file, so nothing half-written is left. On a local disk the
file and its folder are also fsynced (pyarrow's streams cannot), so a commit survives a power cut.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import OutputError
from pipeline.redact import redact_url

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_uri(path: str) -> bool:
    """Whether ``path`` names a filesystem by URI (``s3://...``) rather than a local path."""
    return bool(_URI.match(path))



@dataclass(frozen=True)
class OutputFS:
    """An output folder: ``fs`` and the folder's path in it (``base``, no trailing slash);
    ``where`` names it in messages (the URI or local path, credentials redacted)."""

    fs: pafs.FileSystem
    base: str
    where: str

    @property
    def local(self) -> bool:
        """Whether the folder is on a local disk (file locks, renames and fsync work there)."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str) -> str:
        """The full path of ``rel`` (a path relative to the output folder, ``/``-separated)."""
        return f"{self.base}/{rel}" if self.base else rel

    def rel(self, path: str) -> str:
        """``path`` relative to the output folder."""
        return path[len(self.base) + 1 :] if self.base else path

    def files(self, rel: str) -> list[str]:
        """Relative paths of every file under ``rel`` (recursive; none when it does not exist)."""
        sel = pafs.FileSelector(self.path(rel), recursive=True, allow_not_found=True)
        return sorted(self.rel(i.path) for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File)

    def exists(self, rel: str) -> bool:
        """Whether the file ``rel`` exists."""
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def read_bytes(self, rel: str) -> bytes:
        """The whole content of the file ``rel``."""
        with self.fs.open_input_stream(self.path(rel)) as fh:
            return fh.read()

    def delete(self, rel: str) -> None:
        """Delete the file ``rel`` if it exists."""
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass

    def write_atomic(self, rel: str, fill: Callable[[BinaryIO], None]) -> None:
        """Create or replace the file ``rel`` with what ``fill(stream)`` writes, atomically (see the
        module docstring). An `OSError` (a full disk, a lost connection) becomes an `OutputError`."""
        folder, name = rel.rpartition("/")[::2]
        tmp = f"{folder}/.{name}.tmp" if folder else f".{name}.tmp"
        try:
            if self.local:
                self.fs.create_dir(self.path(folder) if folder else self.base, recursive=True)
            self._write(tmp, fill)
            self.fs.move(self.path(tmp), self.path(rel))
            if self.local:
                _fsync(self.path(folder) if folder else self.base)
        except BaseException as exc:
            self.delete(tmp)
            if isinstance(exc, OSError):
                raise OutputError(_os_message(exc, rel), source=self.where) from None
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        """`write_atomic` of ``data``."""
        self.write_atomic(rel, lambda fh: fh.write(data))

    def _write(self, rel: str, fill: Callable[[BinaryIO], None]) -> None:
        """Write ``rel`` (the one place a file's bytes are written: a test fills the disk here)."""
        with self.fs.open_output_stream(self.path(rel)) as fh:
            fill(fh)
        if self.local:
            _fsync(self.path(rel))


def open_output(dir: str | Path) -> OutputFS:
    """The `OutputFS` of an output folder given as a local path or a URI (see the module docstring)."""
    text = str(dir)
    if not is_uri(text):
        return OutputFS(pafs.LocalFileSystem(), Path(text).resolve().as_posix(), text)
    where = redact_url(text)
    if where != text:  # it would be copied into actor arguments, summaries and logs
        raise OutputError("put the store's credentials in the environment (AWS_ACCESS_KEY_ID, ...), not in the "
                          "output URI", source=where)
    try:
        if text.startswith("s3://") and "?" not in text:  # with ?endpoint_override=... options: from_uri's own
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
            fs = pafs.S3FileSystem(endpoint_override=endpoint, region=region)
            base = text[len("s3://") :]
        else:
            fs, base = pafs.FileSystem.from_uri(text)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise OutputError(f"cannot open the output folder: {_first_line(exc)}", source=where) from None
    if isinstance(fs, pafs.LocalFileSystem):
        return OutputFS(fs, Path(base).resolve().as_posix(), where)
    return OutputFS(fs, base.rstrip("/"), where)


def _os_message(exc: OSError, rel: str) -> str:
    if exc.errno == errno.ENOSPC or "No space left" in str(exc):
        return f"no space left on the device while writing {rel}; nothing half-written was left: free space and rerun to resume"
    return f"cannot write {rel}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _fsync(path: str) -> None:
    """fsync a local file or folder (pyarrow's streams cannot)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
