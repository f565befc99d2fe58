"""The package's shape, read from its source: no import circles, no borrowed private names.

Every ``import`` in ``em_interp`` counts, also those inside functions (a deferred import still
ties two modules together). Edges go to the module that is imported: ``from em_interp.sae import
load_sae`` is an edge to ``em_interp.sae`` (its ``__init__``), ``from em_interp.sae import load``
to ``em_interp.sae.load``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import em_interp

PKG = Path(em_interp.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, names, line)`` for each em_interp import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "em_interp":
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "em_interp":
                    out.append((a.name, [], node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for target, names, _ in _imports(path):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if subs:
                graph[mod].update(subs)
            if len(subs) < len(names) or not names:
                graph[mod].add(target)
        graph[mod].discard(mod)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_circles():
    cycles = _cycles(_graph())
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in MODULES.values():
        for target, names, line in _imports(path):
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    offenders.append(f"{path.relative_to(PKG.parent)}:{line} takes {target}.{n}")
    assert not offenders, "\n".join(offenders)


def test_the_checker_sees_a_planted_circle_and_a_private_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    planted = tmp_path / "m.py"
    planted.write_text("def f():\n    from em_interp.inputs import _secret\n")
    assert _imports(planted) == [("em_interp.inputs", ["_secret"], 2)]


def test_core_modules_import_no_family():
    """Arrows run one way: the core files never import a family package or the run layer."""
    core = ("em_interp.hooks", "em_interp.inputs", "em_interp.metrics", "em_interp.results",
            "em_interp.stats", "em_interp.errors", "em_interp.atomic")
    families = ("activations", "representations", "patching", "readouts", "behaviour",
                "training", "sae", "block_em", "run", "cli")
    graph = _graph()
    bad = [f"{m} -> {t}" for m in core for t in graph[m]
           if t.split(".")[1] in families]
    assert not bad, bad
    bad = [f"{m} -> {t}" for m in graph if m.startswith("em_interp.models") for t in graph[m]
           if t.split(".")[1] in families]
    assert not bad, "models/ must not import a family: " + ", ".join(bad)
