"""The layout: the data flow the design describes, checked on the source tree.

- no import cycle inside ``opq_core`` (top-level and function-local imports alike);
- ``opq_core`` never imports ``torch``, ``opq_torch`` or ``opq_cli`` (the ``.pt`` reader's
  lazy ``torch`` import inside a function of the readers excepted);
- ``numba.njit`` is configured in one place, ``opq_core/_jit.py``;
- no module of the library over ~600 lines;
- the serial and parallel twins of one kernel body stay apart in Numba's disk cache;
- the doctests of every ``opq_core`` module pass.
"""
from __future__ import annotations

import ast
import doctest
import importlib
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ROOT / "opq_core"
LIBRARY = ("opq_core", "opq_torch", "opq_cli")
MAX_LINES = 620


def _modules(package: str):
    base = ROOT / package
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _library_modules():
    """(module, path) of every module of the library packages."""
    for package in LIBRARY:
        yield from _modules(package)


def _imports(modname: str, path: pathlib.Path):
    """(imported module, line, inside a function, names) for every import statement."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    pkg_parts = modname.split(".") if is_pkg else modname.split(".")[:-1]
    out = []

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            f = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    out.append((a.name, child.lineno, in_func, ()))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = pkg_parts[:len(pkg_parts) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                # "from . import stats" names the module opq_core.stats, not opq_core
                out.append((mod, child.lineno, in_func, tuple(a.name for a in child.names)))
            visit(child, f)

    visit(tree, False)
    return out


def _core_graph():
    mods = dict(_modules("opq_core"))
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for target, _, _, names in _imports(m, path):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
            for t in subs or [target]:
                if t in mods and t != m:
                    graph[m].add(t)
    return graph


def _find_cycle(graph):
    state, stack = {}, []

    def dfs(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state:
                c = dfs(v)
                if c:
                    return c
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state:
            c = dfs(u)
            if c:
                return c
    return None


def test_no_import_cycle_in_opq_core():
    graph = _core_graph()
    assert len(graph) > 20
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_opq_core_never_imports_torch_or_the_adapter():
    bad = []
    for m, path in _modules("opq_core"):
        for target, line, in_func, _ in _imports(m, path):
            top = target.split(".")[0]
            if top in ("opq_torch", "opq_cli"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
            elif top == "torch" and not (m in ("opq_core.io", "opq_core._readers") and in_func):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_njit_only_in_jit_module():
    bad = []
    for m, path in _library_modules():
        if m == "opq_core._jit":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, ast.Attribute) and node.attr in ("njit", "jit") and \
                    isinstance(node.value, ast.Name) and node.value.id == "numba":
                name = f"numba.{node.attr}"
            elif isinstance(node, ast.ImportFrom) and node.module == "numba" and \
                    any(a.name in ("njit", "jit") for a in node.names):
                name = "from numba import njit/jit"
            if name:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {name}")
    assert not bad, "\n".join(bad)


def test_no_module_over_the_size_limit():
    big = []
    for m, path in _library_modules():
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            big.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not big, "\n".join(big)


def test_doctests_of_opq_core():
    attempted = 0
    for m, _ in _modules("opq_core"):
        mod = importlib.import_module(m)
        res = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
        assert res.failed == 0, m
        attempted += res.attempted
    assert attempted >= 43


_TWIN_MODULE = textwrap.dedent("""
    from opq_core._jit import prange, twins

    def add_one(x):
        for i in prange(x.shape[0]):
            x[i] += 1.0

    add_one, add_one_par = twins(add_one)
""")

_TWIN_RUN = textwrap.dedent("""
    import sys, numpy as np, numba
    sys.path.insert(0, sys.argv[1])
    import twinmod
    which = sys.argv[2]
    a = np.zeros(1 << 12)
    if which in ("both", "serial"):
        twinmod.add_one(a)
    if which in ("both", "parallel"):
        twinmod.add_one_par(a)
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = "none"
    hits = sum(twinmod.add_one_par.stats.cache_hits.values())
    print(layer, hits, twinmod.add_one_par.py_func.__qualname__)
""")


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"),
                    reason="the disk cache needs the JIT")
def test_twins_keep_apart_in_the_disk_cache(tmp_path):
    """Compile both twins into a fresh cache, then load only the parallel one in a new
    process: it must come from the cache and run parallel code (the threading layer starts
    only when parallel machine code runs)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "twinmod.py").write_text(_TWIN_MODULE)
    env = dict(os.environ, OPQ_NUMBA_CACHE="1", NUMBA_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))

    def run(which):
        r = subprocess.run([sys.executable, "-c", _TWIN_RUN, str(src), which], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    first = run("both")
    assert first[0] != "none" and first[2] == "add_one_par"
    index = sorted(p.name for p in (tmp_path / "cache").rglob("*.nbi"))
    assert len(index) == 2 and any("add_one_par" in n for n in index), index
    layer, hits, _ = run("parallel")
    assert int(hits) >= 1, "the parallel twin was compiled again instead of loaded"
    assert layer != "none", "the cache gave the parallel dispatcher serial machine code"
