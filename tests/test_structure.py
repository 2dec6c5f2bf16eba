"""The package's shape, read with ast: no import cycles, and no function over MAX_FUNCTION_LINES.

Import graph: no module imports, directly or through others, a module that imports it back. Imports inside
functions count too (most of embedtrain imports lazily, so torch stays out of `calc` and the web server): a
cycle of lazy imports still ties two modules into one. Every module is also imported for real, so a module
that only breaks at import time fails here too."""

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "embedtrain"
MAX_FUNCTION_LINES = 100   # a longer function is split into named steps (Trainer.run, the Train tab's build)


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported(name: str, path: Path, known) -> set[str]:
    """The embedtrain modules `name` imports anywhere in its file (a `from M import x` counts as M.x when that
    is a module, else as M)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    out = set()
    for m in found:
        while m and m not in known:
            m = m.rpartition(".")[0]
        if m and m != name:
            out.add(m)
    return out


def graph() -> dict[str, set[str]]:
    names = module_names()
    return {n: imported(n, p, names) for n, p in names.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_embedtrain_module_imports_itself_back():
    edges = graph()
    assert "embedtrain.demo.score" in edges and "embedtrain.study" in edges
    found = cycles(edges)
    assert not found, "import cycles: " + "; ".join(
        " <-> ".join(f"{m} (imports {', '.join(sorted(edges[m] & set(c)))})" for m in c) for c in found)


def test_demo_pretrain_and_score_do_not_import_each_other():
    edges = graph()
    assert "embedtrain.demo.score" not in edges["embedtrain.demo.pretrain"]
    assert "embedtrain.demo.pretrain" not in edges["embedtrain.demo.score"]
    assert {"embedtrain.demo.card", "embedtrain.demo.judge"} <= edges["embedtrain.demo.pretrain"]


@pytest.mark.parametrize("name", list(module_names()))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_no_function_is_over_the_length_limit():
    long = []
    for name, path in module_names().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} ({path.name}:{node.lineno}): {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: " + "; ".join(long)
