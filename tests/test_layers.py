"""The import layering of the whole tree (DESIGN.md "Layers"), read with an AST walk of every module.

``python tools/layers.py`` prints the same facts as a report.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest


def _load_layers():
    here = Path(__file__).resolve().parent
    root = next(p for p in (here, *here.parents) if (p / "pyproject.toml").is_file())
    spec = importlib.util.spec_from_file_location("_layers", root / "tools" / "layers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module, root


layers, ROOT = _load_layers()


@pytest.fixture(scope="module")
def found():
    return layers.imports(ROOT)


def _listing(items) -> str:
    return "\n".join(f"{i.where}: {i.module} imports {i.target}" for i in items)


def test_the_walk_sees_every_layer(found):
    modules = {i.module for i in found}
    for layer in ("perceiver_stream", "pipeline", "actors", "run_pipeline"):
        assert any(layers.layer_of(m) == layer for m in modules), layer


def test_no_layer_imports_upward_or_a_runtime_it_must_not_know(found):
    bad = layers.violations(found)
    assert not bad, "imports against DESIGN.md's layers:\n" + _listing(bad)


def test_no_import_cycle_among_project_modules(found):
    loops = layers.cycles(found)
    assert not loops, "import cycles:\n" + "\n".join(" -> ".join(c) for c in loops)


def test_no_function_local_imports_without_a_reason(found):
    unmarked = layers.local_imports(found)
    hint = f"hoist them, or say why with '{layers.LOCAL_MARK} <why>'"
    assert not unmarked, f"function-local imports ({hint}):\n" + _listing(unmarked)


def _walk(tmp_path: Path, files: dict[str, str]):
    (tmp_path / "pyproject.toml").write_text("")
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return layers.imports(tmp_path)


def test_checks_catch_what_they_forbid(tmp_path):
    found = _walk(
        tmp_path,
        {
            "perceiver_stream/__init__.py": "",
            "perceiver_stream/model.py": "import torch\nfrom pipeline import window\n",
            "pipeline/__init__.py": "",
            "pipeline/window.py": "from . import read\n",
            "pipeline/read.py": "from pipeline.window import Window\nimport ray\n",
            "pipeline/config.py": """\
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from pipeline.read import Thing
                def load():
                    import yaml
                    import json  # local import: why
                    # local import: the line above counts too
                    import csv
            """,
            "actors/__init__.py": "",
            "actors/runner.py": "def go():\n    from jobs import train\n",
            "jobs/__init__.py": "import ray.util\n",
        },
    )
    bad = {(i.module, i.target) for i in layers.violations(found)}
    assert bad == {
        ("perceiver_stream.model", "pipeline.window"),
        ("pipeline.read", "ray"),
        ("actors.runner", "jobs"),
        ("jobs", "ray.util"),
    }
    assert layers.cycles(found) == [["pipeline.read", "pipeline.window", "pipeline.read"]]
    unmarked = {(i.module, i.target) for i in layers.local_imports(found)}
    assert unmarked == {("pipeline.config", "yaml"), ("actors.runner", "jobs")}
    marked = {i.target: i.reason for i in layers.local_imports(found, marked=True)}
    assert marked == {"json": "why", "csv": "the line above counts too"}
    # an import under TYPE_CHECKING closes no cycle at run time
    assert not [i for i in found if i.target == "pipeline.read" and i.module == "pipeline.config" and i.runtime]


def test_report_names_cycles_and_long_modules(tmp_path):
    _walk(tmp_path, {"pipeline/__init__.py": "", "pipeline/a.py": "from pipeline import b\n" + "x = 1\n" * 460,
                     "pipeline/b.py": "import pipeline.a\n"})
    text = layers.report(tmp_path)
    assert "pipeline.a -> pipeline.b -> pipeline.a" in text
    assert "pipeline/a.py (461 lines)" in text
