"""``${NAME}`` in a config's string values, replaced by the environment variable at load.

Passwords stay out of YAML files (``video: rtsp://cam:${CAM_PASSWORD}@cam0.local/stream``); the
config keeps each original string (`substitute_env`'s second result) so that what the project
saves of a config shows ``${CAM_PASSWORD}``, never its value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from pipeline.errors import ConfigError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

Key = tuple[str | int, ...]  # a value's place in the config: keys and list indices


def substitute_env(data: Any, env: Mapping[str, str] | None = None) -> tuple[Any, dict[Key, str]]:
    """A copy of raw config ``data`` with every ``${NAME}`` in a string value replaced by
    ``env[NAME]`` (default: ``os.environ``), and the original of each string that had one, by its
    place. A variable that is not set is a `ConfigError` naming the key and the variable."""
    env = os.environ if env is None else env
    templates: dict[Key, str] = {}

    def walk(value: Any, key: Key) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, (*key, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*key, i)) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        missing = [name for name in _VAR.findall(value) if name not in env]
        if missing:
            where = ".".join(str(k) for k in key)
            raise ConfigError(f"{where}: environment variable {missing[0]} is not set")
        templates[key] = value
        return _VAR.sub(lambda m: env[m[1]], value)

    return walk(data, ()), templates



def restore_templates(data: Any, templates: Mapping[Key, str]) -> Any:
    """``data`` (a config dumped as JSON-like values) with each place in ``templates`` that it
    still has put back to its ``${NAME}`` original; changed in place and returned."""
    for key, template in templates.items():
        node = data
        for k in key[:-1]:
            node = _child(node, k)
        if _child(node, key[-1]) is not None:
            node[key[-1]] = template
    return data


def _child(node: Any, k: str | int) -> Any:
    """``node[k]`` of a dict or list, None where there is none."""
    if isinstance(node, dict):
        return node.get(k)
    if isinstance(node, list) and isinstance(k, int) and 0 <= k < len(node):
        return node[k]
    return None
