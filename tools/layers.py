"""The project's import layering, read from the source with an AST walk (no module is imported).

Layers, one direction only: ``run_pipeline`` -> ``actors`` | ``jobs`` -> ``pipeline`` ->
``perceiver_stream`` (DESIGN.md "Layers"). `FORBIDDEN` names what each layer must not import,
wherever the import stands. A cycle is one among the project's modules through imports that run
when a module is imported (module level, outside ``if TYPE_CHECKING:``). A function-local import
is allowed only with a ``# local import: <why>`` comment on its line or the line above.

    python tools/layers.py            # the report: layers, violations, cycles, local imports, sizes

``tests/test_layers.py`` asserts the same rules.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

LAYERS = ("perceiver_stream", "pipeline", "jobs", "actors", "run_pipeline")
RUNTIMES = ("ray", "av")
FORBIDDEN: dict[str, frozenset[str]] = {
    "perceiver_stream": frozenset({"ray", "av", "pipeline", "jobs", "actors", "run_pipeline"}),
    "pipeline": frozenset({"ray", "jobs", "actors", "run_pipeline"}),
    "jobs": frozenset({"ray", "actors", "run_pipeline"}),
    "actors": frozenset({"jobs", "run_pipeline"}),
}
LOCAL_MARK = "# local import:"
MAX_LINES = 450


@dataclass(frozen=True)
class Import:
    """One imported module: ``target`` as imported by ``module`` at ``line`` of ``path``."""

    module: str
    target: str
    path: Path
    line: int
    local: bool  # inside a function body
    runtime: bool  # runs when ``module`` is imported (module level, not under TYPE_CHECKING)
    reason: str | None  # the text after a `# local import:` mark, if any

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def find_root(start: Path) -> Path:
    """The repository root: the first folder at or above ``start`` holding pyproject.toml."""
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    raise FileNotFoundError(f"no pyproject.toml at or above {start}")


def project_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the layers (``run_pipeline.py`` included)."""
    files: dict[str, Path] = {}
    for layer in LAYERS:
        single = root / f"{layer}.py"
        if single.is_file():
            files[layer] = single
        folder = root / layer
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            if "__pycache__" in rel.parts:
                continue
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            files[".".join(parts)] = path
    return files


def layer_of(name: str) -> str:
    return name.split(".", 1)[0]


class _Walker(ast.NodeVisitor):
    def __init__(self, module: str, path: Path, is_package: bool, known: set[str], lines: list[str]) -> None:
        self.module, self.path, self.known, self.lines = module, path, known, lines
        self.package = module if is_package else module.rpartition(".")[0]
        self.depth = 0  # function nesting
        self.type_checking = 0
        self.found: list[Import] = []

    def _add(self, node: ast.stmt, target: str) -> None:
        reason = None
        first = max(node.lineno - 2, 0)  # the line above counts too
        for text in self.lines[first : node.end_lineno]:
            if LOCAL_MARK in text:
                reason = text.split(LOCAL_MARK, 1)[1].strip() or None
        local = self.depth > 0
        runtime = not local and not self.type_checking
        found = Import(self.module, target, self.path, node.lineno, local, runtime, reason)
        if found not in self.found:  # `from m import a, b` is one import of m
            self.found.append(found)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            pkg = self.package.split(".")
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join([*pkg, *([base] if base else [])])
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(node, sub if sub in self.known else base)

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        guarded = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        )
        if not guarded:
            self.generic_visit(node)
            return
        self.type_checking += 1
        for stmt in node.body:
            self.visit(stmt)
        self.type_checking -= 1
        for stmt in node.orelse:
            self.visit(stmt)


def imports(root: Path) -> list[Import]:
    """Every import statement of every project module (one entry per imported name's module)."""
    files = project_files(root)
    known = set(files)
    out: list[Import] = []
    for module, path in files.items():
        text = path.read_text()
        walker = _Walker(module, path.relative_to(root), path.name == "__init__.py", known, text.splitlines())
        walker.visit(ast.parse(text, filename=str(path)))
        out.extend(walker.found)
    return out


def violations(found: Iterable[Import]) -> list[Import]:
    """Imports that break `FORBIDDEN` (upward or into a runtime the layer must not know)."""
    return [i for i in found if layer_of(i.target) in FORBIDDEN.get(layer_of(i.module), ())]


def local_imports(found: Iterable[Import], *, marked: bool = False) -> list[Import]:
    """Function-local imports without (or, with ``marked``, with) a `LOCAL_MARK` reason."""
    return [i for i in found if i.local and (i.reason is not None) == marked]


def cycles(found: Iterable[Import], *, runtime_only: bool = True) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected group of project modules, through
    the imports that run at import time (``runtime_only=False``: through every import)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for i in found:
        if (i.runtime or not runtime_only) and layer_of(i.target) in LAYERS and i.target != i.module:
            graph[i.module].add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, g) for g in groups]


def _cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest cycle through the group's first module, staying inside the group."""
    start = min(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & group):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    return sorted(group)


def line_counts(root: Path) -> dict[Path, int]:
    """Lines of every project module, keyed by path relative to ``root``."""
    return {p.relative_to(root): len(p.read_text().splitlines()) for p in project_files(root).values()}


def report(root: Path) -> str:
    """The layering report printed by ``python tools/layers.py``."""
    found = imports(root)
    lines: list[str] = ["Layers (the modules each imports of the other layers, and ray/av; any import):"]
    for layer in LAYERS:
        used: dict[str, set[str]] = defaultdict(set)
        for i in found:
            target = layer_of(i.target)
            if layer_of(i.module) == layer and target != layer and target in LAYERS + RUNTIMES:
                used[target].add(i.target.partition(".")[2])
        parts = [t + (f" {{{', '.join(sorted(m - {''}))}}}" if m - {""} else "") for t, m in sorted(used.items())]
        lines.append(f"  {layer} -> {'; '.join(parts) or 'nothing'}")
    bad = violations(found)
    lines.append(f"Layer violations: {len(bad) or 'none'}")
    lines += [f"  {i.where}: {i.module} imports {i.target}{' (function-local)' * i.local}" for i in bad]
    loops = cycles(found)
    lines.append(f"Import cycles (module level): {len(loops) or 'none'}")
    lines += ["  " + " -> ".join(c) for c in loops]
    hidden = [c for c in cycles(found, runtime_only=False) if c not in loops]
    lines.append(f"Import cycles closed only through function-local imports: {len(hidden) or 'none'}")
    lines += ["  " + " -> ".join(c) for c in hidden]
    unmarked, marked = local_imports(found), local_imports(found, marked=True)
    by_layer = defaultdict(int)
    for i in unmarked:
        by_layer[layer_of(i.module)] += 1
    counts = ", ".join(f"{k} {v}" for k, v in sorted(by_layer.items()))
    lines.append(f"Function-local imports without a reason: {len(unmarked)}" + (f" ({counts})" if counts else ""))
    lines += [f"  {i.where}: {i.target}" for i in unmarked]
    lines.append(f"Function-local imports with a '{LOCAL_MARK}' reason: {len(marked)}")
    lines += [f"  {i.where}: {i.target} ({i.reason})" for i in marked]
    sizes = line_counts(root)
    totals = defaultdict(int)
    for path, n in sizes.items():
        totals[layer_of(".".join(path.with_suffix("").parts))] += n
    lines.append("Lines: " + ", ".join(f"{k} {totals[k]}" for k in LAYERS if k in totals))
    largest = max(sizes.items(), key=lambda kv: kv[1], default=None)
    if largest:
        lines.append(f"Largest module: {largest[0]} ({largest[1]} lines)")
    long = sorted(((p, n) for p, n in sizes.items() if n > MAX_LINES), key=lambda kv: -kv[1])
    lines.append(f"Modules over {MAX_LINES} lines: {len(long) or 'none'}")
    lines += [f"  {p} ({n} lines)" for p, n in long]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(find_root(Path(__file__).resolve().parent)))
