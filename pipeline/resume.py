"""The run's effective config, kept in its output folder, and whether a resume may go on.

Each run into an output folder saves its effective config (every default filled in) as
``<output>/_config.yaml`` (a hidden name: readers skip it), as written before substitution (a
``${NAME}`` stays as is) and with every URL redacted (`pipeline.redact`). A later run into the
same folder is refused (`ResumeRefused`, exit 2) when a setting that decides a stream's windows
differs: the ``window``, ``video`` and ``audio`` sections, or the sources of a stream the folder
already has (``video``, ``audio``, ``points``, ``synthetic``); its windows would not continue the
ones committed. Everything else may change (model, runtime, output and source timeouts; the
``model`` column tells rows apart), and streams may be added or removed: a removed stream's
entry stays in the saved file, so bringing it back with other sources is refused too.

`prepare_output` checks and, when the run may go on, saves; a refusal leaves the folder untouched.
"""

from __future__ import annotations

from typing import Any

import yaml

from pipeline.config import Config
from pipeline.envvars import restore_templates
from pipeline.errors import ConfigError
from pipeline.outputfs import open_output
from pipeline.redact import redact_data, redact_text

CONFIG_FILE = "_config.yaml"
WINDOW_SECTIONS = ("window", "video", "audio")
STREAM_SOURCE_KEYS = ("video", "audio", "points", "synthetic")
_HEADER = (
    "# The effective config of the last run into this folder (perceiver-stream): ${NAME} as written,\n"
    "# URLs redacted; streams no longer configured are kept. A resume with other window settings is refused.\n"
)


class ResumeRefused(ConfigError):
    """A run into an existing output folder whose window settings differ from the folder's."""


def effective_config(cfg: Config, output: str) -> dict[str, Any]:
    """``cfg`` as saved: JSON-like values, ``${NAME}`` put back, URLs redacted, ``output.dir`` the
    folder the run writes into."""
    data = restore_templates(cfg.model_dump(mode="json"), cfg.env_templates)
    data["output"]["dir"] = output
    return redact_data(data)


def window_differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys deciding windows whose values differ between two saved configs: ``window.hop``,
    ``streams[cam0].video``, ... (streams only in one of them do not count)."""
    keys = [
        f"{section}.{key}"
        for section in WINDOW_SECTIONS
        for key in sorted({*saved.get(section, {}), *new.get(section, {})})
        if saved.get(section, {}).get(key) != new.get(section, {}).get(key)
    ]
    before = {s["id"]: s for s in saved.get("streams", [])}
    for stream in new.get("streams", []):
        old = before.get(stream["id"])
        if old is not None:
            keys += [f"streams[{stream['id']}].{k}" for k in STREAM_SOURCE_KEYS if old.get(k) != stream.get(k)]
    return keys


def prepare_output(cfg: Config, output: str) -> None:
    """Refuse (`ResumeRefused`) a run whose window settings differ from those saved in ``output``
    (a local folder or a pyarrow filesystem URI), else save its effective config there (with the
    saved entries of streams it no longer has)."""
    out = open_output(output)
    new = effective_config(cfg, output)
    if out.exists(CONFIG_FILE):
        saved = yaml.safe_load(out.read_bytes(CONFIG_FILE)) or {}
        differ = window_differences(saved, new)
        if differ:
            raise ResumeRefused(
                f"{redact_text(output)} holds windows cut with other settings ({', '.join(differ)} "
                f"{'differs' if len(differ) == 1 else 'differ'} from its {CONFIG_FILE}); resume with those settings "
                "or write into another --output"
            )
        ids = {s["id"] for s in new["streams"]}
        new["streams"] += [s for s in saved.get("streams", []) if s["id"] not in ids]
    out.write_bytes(CONFIG_FILE, (_HEADER + yaml.safe_dump(new, sort_keys=False)).encode())

