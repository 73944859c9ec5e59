"""The package's layout (docs/ARCHITECTURE.md): no import cycle between apd_ext
modules, every module imports alone, no pure re-export shim, no submodule
shadowed by a package attribute of the same name."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "python" / "apd_ext"


def _modules() -> dict:
    """{dotted name: path} of every .py under python/apd_ext. Files outside a
    package (loaded by path by transformers / lm-eval) are named by their path."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        in_pkg = all((PKG.parent.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts)))
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts) if in_pkg else "file:" + "/".join(rel.parts) + ".py"] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module):
    """Import nodes executed when the module is imported: not in function
    bodies (or lambdas), not under `if TYPE_CHECKING:`."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module of `from ... import` in `module` (a package when is_pkg)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(modules: dict) -> dict:
    """{module: set of apd_ext modules it imports at module level}. `from p
    import x` is an edge to p.x when that is a module, else to p (x is then
    a name of p's __init__, which runs first)."""
    known = {m for m in modules if not m.startswith("file:")}
    graph = {}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        edges = set()
        for node in _module_level_imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = _resolve(mod, is_pkg, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            edges.update(t for t in targets if t in known and t != mod)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict):
    """A cycle of `graph` ({node: successors}) as [a, b, ..., a], or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {v: WHITE for v in graph}
    stack: list = []

    def visit(v):
        colour[v] = GREY
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if colour.get(w, WHITE) == GREY:
                return stack[stack.index(w):] + [w]
            if colour.get(w, WHITE) == WHITE:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        colour[v] = BLACK
        return None

    for v in sorted(graph):
        if colour[v] == WHITE:
            found = visit(v)
            if found:
                return found
    return None


def test_find_cycle_reports_a_cycle():
    """The check below can fail: a synthetic graph with a cycle is caught and
    the cycle is named; an acyclic one (a diamond) passes."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None


def test_import_graph_sees_module_level_imports_only(tmp_path):
    """The graph on a synthetic package: a module-level cycle is an edge pair,
    imports in functions and under TYPE_CHECKING are not edges, and `from pkg
    import name` of a non-module name is an edge to the package's __init__."""
    pkg = tmp_path / "apd_ext"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from apd_ext.sub.a import f\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from apd_ext import helper\n\ndef f():\n    from apd_ext.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                      "    from apd_ext.sub import a\nfrom . import c\n")
    (pkg / "sub" / "c.py").write_text("import apd_ext.sub.b\n")
    (pkg / "helper.py").write_text("")
    mods = {"apd_ext": pkg / "__init__.py", "apd_ext.sub": pkg / "sub" / "__init__.py",
            "apd_ext.sub.a": pkg / "sub" / "a.py", "apd_ext.sub.b": pkg / "sub" / "b.py",
            "apd_ext.sub.c": pkg / "sub" / "c.py", "apd_ext.helper": pkg / "helper.py"}
    g = import_graph(mods)
    assert g["apd_ext"] == {"apd_ext.sub.a"}
    assert g["apd_ext.sub.a"] == {"apd_ext.helper"}  # a module named by `from apd_ext import helper`
    assert g["apd_ext.sub.b"] == {"apd_ext.sub.c"}  # the relative import; TYPE_CHECKING excluded
    assert find_cycle(g) == ["apd_ext.sub.b", "apd_ext.sub.c", "apd_ext.sub.b"]
    (pkg / "sub" / "a.py").write_text("from apd_ext import f\n")  # a name of the package __init__
    assert find_cycle(import_graph(mods)) == ["apd_ext", "apd_ext.sub.a", "apd_ext"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph(_modules()))
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


# Run in a child per module (forked from a parent that imported only torch and
# the optional third-party packages, never apd_ext): each module is the first
# apd_ext module its child imports.
_CHILD = r"""
import importlib, importlib.util, os, sys, traceback
import torch  # noqa: F401  (shared by the children: only apd_ext must be fresh)
for heavy in ("transformers", "transformers.generation.utils", "fastapi", "lm_eval"):  # optional, slow to import
    try:
        importlib.import_module(heavy)
    except Exception:
        pass
assert not [m for m in sys.modules if m == "apd_ext" or m.startswith("apd_ext.")]
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if name.startswith("file:"):
                path = name[5:]
                spec = importlib.util.spec_from_file_location("_layout_probe", path)
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            else:
                importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and not e.name.startswith("apd_ext"):
                print(f"SKIP {name}: {e.name} is not installed", flush=True)
            else:
                traceback.print_exc()
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed.append(name)
print("FAILED", " ".join(failed))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one child per module")
def test_every_module_imports_alone():
    mods = _modules()
    names = [m if not m.startswith("file:") else "file:" + str(mods[m]) for m in mods]
    env = dict(os.environ, PYTHONPATH=str(PKG.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _CHILD, *names], capture_output=True, text=True, env=env,
                         timeout=300, cwd=str(PKG.parent.parent))
    assert res.returncode == 0, res.stderr[-4000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last == "FAILED", f"modules that do not import alone: {last[7:]}\n{res.stderr[-4000:]}"


def _is_shim(tree: ast.Module) -> bool:
    """Only a docstring, imports and __all__ at top level, importing from apd_ext."""
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    imports = [n for n in body if isinstance(n, (ast.Import, ast.ImportFrom))]
    rest = [n for n in body if n not in imports and not (
        isinstance(n, ast.Assign) and [getattr(t, "id", None) for t in n.targets] == ["__all__"])]
    from_pkg = any((isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("apd_ext")))
                   or (isinstance(n, ast.Import) and any(a.name.startswith("apd_ext") for a in n.names))
                   for n in imports)
    return not rest and from_pkg


def test_is_shim_detects_a_reexport():
    assert _is_shim(ast.parse('"""x"""\nfrom apd_ext.decoding.engine import Engine\n__all__ = ["Engine"]\n'))
    assert not _is_shim(ast.parse("from apd_ext.x import y\n\ndef f():\n    return y\n"))
    assert not _is_shim(ast.parse("import os\n"))


def test_no_reexport_shims_or_shadowed_modules():
    """No module (package __init__s aside: they are the public API) only
    re-exports names of other apd_ext modules; and no package binds a name
    that is also one of its submodules to something else (importing the
    submodule would rebind it, as apd_ext/generate.py did to generate())."""
    mods = _modules()
    shims = [m for m, p in mods.items() if p.name != "__init__.py" and _is_shim(ast.parse(p.read_text()))]
    assert not shims, f"pure re-export modules: {shims}"
    shadowed = []
    for m, p in mods.items():
        if p.name != "__init__.py":
            continue
        subs = {q.split(".")[-1] for q in mods if q.startswith(m + ".") and q.count(".") == m.count(".") + 1}
        tree = ast.parse(p.read_text())
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    bound = a.asname or a.name
                    src = _resolve(m, True, node)
                    if bound in subs and f"{src}.{a.name}" != f"{m}.{bound}":
                        shadowed.append(f"{m}.{bound}")
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in subs:
                shadowed.append(f"{m}.{node.name}")
    assert not shadowed, f"package names that shadow a submodule: {shadowed}"


def test_architecture_lists_every_module():
    """docs/ARCHITECTURE.md has one line per module under python/apd_ext, and no stale one."""
    doc = (PKG.parent.parent / "docs" / "ARCHITECTURE.md").read_text()
    listed = {line.split("`")[1] for line in doc.splitlines() if line.startswith("| `")}
    files = {str(p.relative_to(PKG)) for p in _modules().values()}
    assert files - listed == set(), f"modules missing from docs/ARCHITECTURE.md: {sorted(files - listed)}"
    assert listed - files == set(), f"docs/ARCHITECTURE.md lists modules that do not exist: {sorted(listed - files)}"


# The oracles and anything of tests/: never imported at module level by what
# `import apd_ext`, `apd bench`, `apd sweep` and apd_ext.tiny load.
_TEST_ONLY = {"apd_ext.reference", "apd_ext.reference_loop"}
_PRODUCT_ROOTS = ("apd_ext", "apd_ext.cli", "apd_ext.decoding.bench", "apd_ext.tiny.sweep", "apd_ext.tiny.demo")


def test_product_paths_import_nothing_test_only():
    mods = _modules()
    graph = import_graph(mods)
    seen, todo = set(), list(_PRODUCT_ROOTS)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    assert seen & _TEST_ONLY == set(), f"test-only modules on a product path: {sorted(seen & _TEST_ONLY)}"
    outside = []
    for m, p in mods.items():
        for node in _module_level_imports(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            outside += [f"{m}: {n}" for n in names if n.split(".")[0] in ("tests", "pytest", "faults", "emu_backend")]
    assert not outside, f"module-level imports of test code: {outside}"
