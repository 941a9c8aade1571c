"""The layers of docs/ARCHITECTURE.md ("Layers"), checked on the source: imports point one way.

Every .py file of the package (ccl/ = pyccl, transports/ = pyccl.transports, topology/ =
pyccl.topology) is parsed with `ast`; every import counts, at top level and inside functions,
relative ones resolved. An import of a package runs its __init__, but that implicit parent is
not an edge; `import pyccl` or `from pyccl import name` (name not a submodule) is an edge to the
package __init__, which is the top layer. Third-party imports are not looked at.

Checked: every module has a layer in LAYERS; no import goes to a higher layer; transports and
topology never import each other; no import cycle among pyccl modules. No subprocess: fast.
"""
import ast
import importlib.machinery
import os
from typing import NamedTuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: folder -> import name (pyproject.toml's package-dir)
ROOTS = {"ccl": "pyccl", "transports": "pyccl.transports", "topology": "pyccl.topology"}


class Layer(NamedTuple):
    level: int          # an import may go to the same or a lower level only
    name: str


BASE = Layer(0, "base")
TRANSPORTS = Layer(1, "transports")
TOPOLOGY = Layer(1, "topology")         # beside transports: neither imports the other
ENGINES = Layer(2, "engines")
COMMUNICATOR = Layer(3, "communicator")
TOP = Layer(4, "top")

#: The layer map, lowest first. "x.*" is module x and everything under it; a plain name is that
#: module only; the longest key that matches wins. Every `__main__` module is TOP whatever its
#: folder (running it as a program puts it on top).
LAYERS = {
    # base: errors, dtypes, buffers, settings, call signature, recorder, the C cores
    "pyccl.errors": BASE,
    "pyccl.dtypes": BASE,
    "pyccl.buffers": BASE,
    "pyccl.cuda_buffers": BASE,
    "pyccl.callsig": BASE,
    "pyccl.recorder": BASE,
    "pyccl.reduce": BASE,
    "pyccl.process": BASE,
    "pyccl.settings": BASE,
    "pyccl.call": BASE,                 # the call descriptor every engine reads
    "pyccl._native": BASE,              # cffi extension (native/build.py)
    "pyccl._verbs": BASE,               # cffi extension (native/build_verbs.py)
    # transports: Connection, Transport, selection, TCP dialing
    "pyccl.transports.*": TRANSPORTS,
    # topology: pure (hosts graph, plan builders, cost model, simulator, detection)
    "pyccl.topology.*": TOPOLOGY,
    # engines: one module or small package per engine; the tuner that picks a plan
    "pyccl.engines.*": ENGINES,
    "pyccl.tuner": ENGINES,
    # communicator: validation, the call queue, bootstrap and store, windows
    "pyccl.communicator": COMMUNICATOR,
    "pyccl.queue": COMMUNICATOR,        # the one call queue and Work; engines get it as an object
    "pyccl.validate": COMMUNICATOR,
    "pyccl.bootstrap": COMMUNICATOR,
    "pyccl.store": COMMUNICATOR,
    "pyccl.store_wire": COMMUNICATOR,   # split from pyccl.store
    "pyccl.store_server": COMMUNICATOR,
    "pyccl.tcp_store": COMMUNICATOR,
    "pyccl.env": COMMUNICATOR,
    "pyccl.elastic": COMMUNICATOR,      # grow and join (Communicator.grow, pyccl.join)
    "pyccl.suspension": COMMUNICATOR,   # Communicator.memory / suspend / resume
    "pyccl.windows.*": COMMUNICATOR,
    # top: the package itself, the torch backend, the launcher, command-line tools
    "pyccl": TOP,
    "pyccl.torch_backend.*": TOP,
    "pyccl.launch": TOP,
    "pyccl.doctor": TOP,
    "pyccl.plan": TOP,
    "pyccl.tune": TOP,
}


def layer_of(module: str):
    if module.rsplit(".", 1)[-1] == "__main__":
        return TOP
    best, found = -1, None
    for key, layer in LAYERS.items():
        if key.endswith(".*"):
            prefix = key[:-2]
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), layer
        elif module == key and len(key) >= best:
            best, found = len(key), layer
    return found


# ---- the package's modules and their imports ------------------------------------------------
def package_modules() -> dict:
    """{module name: path} for every .py file and compiled extension of the package."""
    out = {}
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    for folder, pkg in ROOTS.items():
        top = os.path.join(REPO, folder)
        for dirpath, dirnames, files in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            rel = os.path.relpath(dirpath, top)
            here = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            for f in sorted(files):
                path = os.path.join(dirpath, f)
                if f == "__init__.py":
                    out[here] = path
                elif f.endswith(".py"):
                    out[f"{here}.{f[:-3]}"] = path
                elif f.endswith(suffixes):
                    out[f"{here}.{f.split('.', 1)[0]}"] = path
    return out


class Edge(NamedTuple):
    src: str
    dst: str
    where: str          # file:line
    text: str           # the import as written


def _text(node) -> str:
    if isinstance(node, ast.Import):
        return "import " + ", ".join(a.name for a in node.names)
    if isinstance(node, ast.ImportFrom):
        return f"from {'.' * node.level}{node.module or ''} import " + ", ".join(a.name for a in node.names)
    return ast.unparse(node)


def _imported(module: str, node, modules: dict) -> list:
    """The dotted names one import statement (or importlib.import_module("...")) imports."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.Call):
        return [node.args[0].value]
    if node.level:
        pkg = module if modules[module].endswith("__init__.py") else module.rpartition(".")[0]
        parts = pkg.split(".")
        if node.level - 1 >= len(parts):
            return [f"<beyond the top package: {_text(node)}>"]
        base = ".".join(parts[:len(parts) - node.level + 1])
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module
    # `from X import name`: the submodule X.name when there is one, else X itself
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]


def _is_import_module(node) -> bool:
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
    return (name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str))


def import_edges(modules: dict) -> tuple:
    """(edges between pyccl modules, problems: imports of pyccl names that are no module)."""
    edges, problems = [], []
    for mod, path in sorted(modules.items()):
        if not path.endswith(".py"):
            continue
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        rel = os.path.relpath(path, REPO)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                if not _is_import_module(node):
                    continue
            elif not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported(mod, node, modules):
                if name != "pyccl" and not name.startswith(("pyccl.", "<")):
                    continue
                where = f"{rel}:{node.lineno}"
                if name not in modules:
                    problems.append(f"{where}: `{_text(node)}` imports {name}, which is no module of the package")
                elif name != mod:
                    edges.append(Edge(mod, name, where, _text(node)))
    return list(dict.fromkeys(edges)), problems      # `from m import a, b`: one edge


MODULES = package_modules()
EDGES, BROKEN = import_edges(MODULES)


def _fmt(e: Edge) -> str:
    return f"{e.where}: {e.src} ({layer_of(e.src).name}) imports {e.dst} ({layer_of(e.dst).name}): `{e.text}`"


# ---- the checks --------------------------------------------------------------------------------
def test_the_parse_sees_the_package():
    """A guard on the checks below: they look at the real package (not an empty walk)."""
    for must in ("pyccl", "pyccl.communicator", "pyccl.transports.tcp", "pyccl.topology.graph", "pyccl._native"):
        assert must in MODULES, f"{must} not found under {REPO}: the module walk is broken"
    assert len(EDGES) > 50


def test_every_import_names_a_module():
    assert not BROKEN, "imports of pyccl names that are no module:\n" + "\n".join(BROKEN)


def test_every_module_has_a_layer():
    missing = [f"{os.path.relpath(p, REPO)}: {m}" for m, p in sorted(MODULES.items()) if layer_of(m) is None]
    assert not missing, ("modules in no layer: add them to LAYERS in tests/test_layers.py (and say why in "
                         "docs/ARCHITECTURE.md's layer picture):\n" + "\n".join(missing))


def test_imports_point_down():
    up = [_fmt(e) for e in EDGES if layer_of(e.src) and layer_of(e.dst) and layer_of(e.dst).level > layer_of(e.src).level]
    assert not up, f"{len(up)} import(s) go up a layer:\n" + "\n".join(up)


def test_transports_and_topology_stay_apart():
    apart = {TRANSPORTS, TOPOLOGY}
    cross = [_fmt(e) for e in EDGES if {layer_of(e.src), layer_of(e.dst)} == apart]
    assert not cross, "transports and topology import each other:\n" + "\n".join(cross)


def _cycles(edges) -> list:
    """One cycle (a list of edges) per strongly connected component of more than one module."""
    graph = {}
    for e in edges:
        graph.setdefault(e.src, {}).setdefault(e.dst, e)
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(root):                         # Tarjan, iterative (deep chains stay safe)
        work = [(root, iter(graph.get(root, ())))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(graph.get(w, ()))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:                       # shortest way back to the start, inside the component
        start = min(comp)
        prev, frontier = {start: None}, [start]
        while frontier and start not in [w for v in frontier for w in graph.get(v, ())]:
            nxt = []
            for v in frontier:
                for w in sorted(graph.get(v, ())):
                    if w in comp and w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph.get(v, ()))
        path = [graph[last][start]]
        while last != start:
            path.append(graph[prev[last]][last])
            last = prev[last]
        out.append((sorted(comp), path[::-1]))
    return out


def test_no_import_cycles():
    found = _cycles(EDGES)
    msg = []
    for comp, path in found:
        msg.append(f"{len(comp)} modules import each other ({', '.join(comp)}); one cycle:")
        msg += [f"    {_fmt(e)}" for e in path]
        inside = [e for e in EDGES if e.src in comp and e.dst in comp and e not in path]
        msg += ["  and the other imports among them:"] + [f"    {_fmt(e)}" for e in inside] if inside else []
    assert not found, "import cycles among pyccl modules:\n" + "\n".join(msg)


@pytest.mark.parametrize("module,layer", [("pyccl", TOP), ("pyccl.topology.__main__", TOP),
                                          ("pyccl.topology.graph", TOPOLOGY), ("pyccl.engines.cuda.lane", ENGINES),
                                          ("pyccl.errors", BASE), ("pyccl.unknown", None)])
def test_layer_lookup(module, layer):
    """The map's reading rules: exact names, "x.*" prefixes, __main__ on top, unknown is None."""
    assert layer_of(module) == layer


def test_the_cycle_finder_reports_a_real_cycle():
    """The cycle check would see one: a -> b -> c -> a, reported edge by edge in order."""
    edges = [Edge("a", "b", "a.py:1", ""), Edge("b", "c", "b.py:2", ""), Edge("c", "a", "c.py:3", ""),
             Edge("c", "d", "c.py:4", "")]
    (comp, path), = _cycles(edges)
    assert comp == ["a", "b", "c"] and [(e.src, e.dst) for e in path] == [("a", "b"), ("b", "c"), ("c", "a")]
