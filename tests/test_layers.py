"""The layering of ratefit's subpackages, checked on the source (nothing is imported).

``codecs`` takes bytes and returns bytes or arrays: no storage, no cluster, nothing above it.
``workers`` (storage, the per-item processors) uses codecs, never ``jobs`` nor ``cluster``. ``cluster`` is
Ray and S3 plumbing on its own. ``jobs`` (the drivers and the command line) may use all.
Every import counts, at module level or inside a function, and so does a module named as
a string literal (``import_module("ratefit.codecs.zoo")``, the registry's table of built-ins),
but not a module's ``if __name__ == "__main__":`` block; the import graph among ratefit's
modules has no cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("codecs", "workers", "jobs", "cluster")
# What each layer must not import: top-level third-party names and ratefit subpackages.
FORBIDDEN = {
    "codecs": ("fsspec", "s3fs", "ray", "pyarrow", "ratefit.workers", "ratefit.jobs", "ratefit.cluster"),
    "workers": ("ratefit.jobs", "ratefit.cluster"),
    "cluster": ("ratefit.jobs", "ratefit.workers", "ratefit.codecs"),
    "jobs": (),
}
_MODULE_NAME = re.compile(r"ratefit\.(?:%s)(?:\.[A-Za-z_]\w*)*" % "|".join(SUBPACKAGES))


def _modules() -> dict[str, Path]:
    found = {}
    for sub in SUBPACKAGES:
        for path in sorted((ROOT / sub).rglob("*.py")):
            if not all((d / "__init__.py").is_file() for d in path.parents if ROOT / sub in (d, *d.parents)):
                continue   # a script beside the package (cluster/gpu/), not one of its modules
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(("ratefit",) + parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The ratefit module ``name`` loads (a module, else its nearest package), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_main_block(node: ast.stmt) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported name, line, is a real import statement) for every import in ``module``.

    ``from ratefit.x import y`` names ``ratefit.x.y`` when that is a module, else ``ratefit.x``.
    String literals naming a ratefit module come back with ``False``: they count for the
    layers (they are imported at run time), not for cycles (they are imported lazily).
    """
    tree = ast.parse(path.read_text(), str(path))
    # A module's ``if __name__ == "__main__":`` block runs only when it is run as a script,
    # i.e. as another module (``__main__``), so its imports are no edges of this one.
    tree.body = [n for n in tree.body if not _is_main_block(n)]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, int, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, True) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full if full in MODULES else base, node.lineno, True))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_NAME.fullmatch(node.value):
            out.append((node.value, node.lineno, False))
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _layer(module: str) -> str:
    return module.split(".")[1]


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_every_subpackage_was_found():
    assert {_layer(m) for m in MODULES} == set(SUBPACKAGES)
    assert "ratefit.codecs.zoo" in MODULES and "ratefit.workers.storage" in MODULES


def test_no_layer_imports_what_is_above_it_or_storage_into_codecs():
    violations = [f"{module} (line {line}) imports {name}: {_layer(module)}/ must not import {prefix}"
                  for module, imports in GRAPH.items()
                  for name, line, _ in imports
                  for prefix in FORBIDDEN[_layer(module)] if _matches(name, prefix)]
    assert not violations, "layer violations:\n" + "\n".join(violations)


def _cycles() -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component."""
    edges = {m: sorted({r for name, _, real in imps if real and (r := _resolve(name)) and r != m})
             for m, imps in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:   # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    cycles = []
    for component in components:   # a shortest way back to the component's first module
        start, members = component[0], set(component)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = [w for w in edges[path[-1]] if w in members]
            if start in nxt:
                cycles.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return cycles


def test_the_job_path_never_uses_the_tools():
    """``jobs/tools/`` (train, eval, fuzz, bench, export-zoo, demo) sits beside the job path: only
    the command line that offers them may import them."""
    violations = [f"{module} (line {line}) imports {name}"
                  for module, imports in GRAPH.items()
                  if _layer(module) == "jobs" and not _matches(module, "ratefit.jobs.tools")
                  and module != "ratefit.jobs.cli"
                  for name, line, _ in imports if _matches(name, "ratefit.jobs.tools")]
    assert not violations, "the job path imports a tool:\n" + "\n".join(violations)


def test_no_import_cycles():
    cycles = _cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from ratefit.jobs import spec\n    import fsspec\n"
                   "from . import weights\nX = 'ratefit.workers.storage'\n"
                   "if __name__ == '__main__':\n    import ratefit.jobs.cli\n")
    found = {(n, real) for n, _, real in _imports("ratefit.codecs.m", src)}
    assert found == {("ratefit.jobs.spec", True), ("fsspec", True), ("ratefit.codecs.weights", True),
                     ("ratefit.workers.storage", False)}
