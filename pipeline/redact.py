"""Credentials out of everything the project writes: URLs with their secrets masked.

A camera URL may carry a password (``rtsp://user:secret@cam/stream``) or a token in its query
(``?token=...``). Every boundary where text leaves the process (``errors`` rows, log lines,
Parquet values and metadata, the console summary, ``inspect``, the saved config) passes it
through `redact_text`, and exceptions of `pipeline.errors` redact their message when raised.

- ``scheme://user:password@host`` becomes ``scheme://user:***@host``; ``scheme://token@host``
  (a user name alone, often a token) becomes ``scheme://***@host``;
- a query parameter whose name holds ``pass``, ``pwd``, ``token``, ``secret``, ``key``, ``auth``,
  ``sig`` or ``credential`` keeps its name and loses its value: ``?token=***``;
- a ``${NAME}`` placeholder in either place is kept (the saved config shows where a secret goes).
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# The authority's userinfo: everything between "scheme://" and the last "@" before the path. A
# password may hold an unescaped "@" (cameras accept it), so the match is greedy up to a "/",
# "?", "#", whitespace or a quote (the end of a URL inside a message).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<info>[^/?#\s'\"<>]*)@")
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;][^=&#\s'\"]*(?:pass|pwd|token|secret|key|auth|sig|credential)[^=&#\s'\"]*=)(?P<value>[^&#\s'\"]*)",
    re.IGNORECASE,
)


# A ``${NAME}`` placeholder (`pipeline.envvars`) is where a secret goes, not one: it is kept.
_PLACEHOLDER = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")


def _mask(value: str) -> str:
    return value if _PLACEHOLDER.fullmatch(value) else MASK


def _mask_userinfo(m: re.Match[str]) -> str:
    user, sep, password = m["info"].partition(":")
    return f"{m['scheme']}{user}:{_mask(password)}@" if sep else f"{m['scheme']}{_mask(user)}@"


def redact_text(text: str) -> str:
    """``text`` with the secrets of every URL in it masked (see the module docstring)."""
    if "://" in text:
        text = _USERINFO.sub(_mask_userinfo, text)
    if "=" in text:
        text = _QUERY_SECRET.sub(lambda m: m["name"] + _mask(m["value"]), text)
    return text


def redact_url(url: str | None) -> str | None:
    """One URL or path with its secrets masked (None passes through)."""
    return None if url is None else redact_text(url)


def redact_data(data: Any) -> Any:
    """A copy of JSON-like ``data`` (dicts, lists, scalars) with every string redacted."""
    if isinstance(data, str):
        return redact_text(data)
    if isinstance(data, dict):
        return {k: redact_data(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact_data(v) for v in data]
    return data
