"""The user's side of a config: ``--set dotted.key=value`` overrides of raw config data, and
validation errors as one line naming each key (see `pipeline.config.load_config`)."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.errors import ConfigError


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``dotted.key=value`` override to raw config data in place.

    The value is parsed as YAML (``3`` is an int, ``[64, 64]`` a list, ``null`` None); list items
    are addressed by index, and index ``len(list)`` appends a new item.
    """
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({first_line(e)})") from None
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"override {key}: {'.'.join(parts[:i]) or key} is a list, index it by number")
            idx = int(part)
            if idx > len(node):
                raise ConfigError(f"override {key}: index {idx} is past the end of a list of {len(node)}")
            if idx == len(node):
                node.append(None)
            if last:
                node[idx] = value
            else:
                if node[idx] is None:
                    node[idx] = [] if parts[i + 1].isdigit() else {}
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = [] if parts[i + 1].isdigit() else {}
                node = node[part]
        else:
            raise ConfigError(f"override {key}: {where.rsplit('.', 1)[0]} is a value, not a section")


def first_line(e: Exception) -> str:
    """An exception's message on one line."""
    return " ".join(str(e).split())


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<top level>"


def validation_message(exc: ValidationError) -> str:
    """Each error of ``exc`` as ``dotted.key: what is wrong``, joined by '; '."""
    parts = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            msg = f"{msg} (got {err['input']!r})"
        parts.append(f"{_format_loc(err['loc'])}: {msg}")
    return "; ".join(parts)
