"""The command line's logging: a level, text or JSON lines on stderr, and nothing unredacted.

`setup_logging("info", "json")` makes every record one JSON object per line with ``ts`` (UTC, ISO
8601), ``level``, ``logger``, ``msg`` and the record's fields (what the caller passed as
``extra``); ``text`` is ``ts level logger: msg``. Either way the line is redacted
(`pipeline.redact`), and `install_redaction` makes every record this process creates redacted
at birth, whichever handler then writes it.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import IO, Any

from pipeline.redact import redact_data, redact_text

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _utc(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """``ts level logger: msg`` (and the traceback), redacted."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        line = f"{_utc(record)} {record.levelname} {record.name}: {record.message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact_text(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``msg``, its fields, and ``exc``
    (the traceback) when there is one; redacted."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _utc(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_"))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(redact_data(out), default=str)


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record comes (a redirect, a capture)."""

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, _value: IO[str]) -> None:
        pass


def install_redaction() -> None:
    """Redact every log record this process creates from now on (its message, with its arguments
    merged in), whichever logger or handler takes it. Idempotent."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "redacts", False):
        return

    def redacted(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.msg, record.args = redact_text(record.getMessage()), None
        return record

    redacted.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacted)


def setup_logging(level: str = "info", fmt: str = "text", *, stream: IO[str] | None = None) -> None:
    """Log records at ``level`` and above to ``stream`` (stderr) as ``fmt`` lines, redacted."""
    if level not in LEVELS or fmt not in FORMATS:
        raise ValueError(f"log level {level!r} / format {fmt!r}: expected one of {LEVELS} / {FORMATS}")
    install_redaction()
    handler = logging.StreamHandler(stream) if stream is not None else _Stderr()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "pstream", False)]:
        root.removeHandler(old)
    handler.pstream = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())


def adopt_logger(name: str) -> None:
    """Send logger ``name`` (a library's, with a handler of its own, such as Ray's: call it after
    importing the library) through `setup_logging`'s handler, so that every line has one format."""
    lg = logging.getLogger(name)
    lg.handlers.clear()
    lg.propagate = True
    lg.setLevel(logging.NOTSET)
