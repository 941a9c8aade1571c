"""docs/ARCHITECTURE.md against the code: every path and name it gives exists, every engine is in its table.

The page is read as text; nothing is run but imports of the package (no subprocess: fast).
The rules, each a test below:

paths   A word starting with one of the repository's folders (ccl/, transports/, topology/,
        native/, tests/, bench/, docs/, examples/), in backticks or plain text, is a path:
        it must exist (file or folder). Words with a placeholder (`<`, `*`) are recipes and
        skipped; a trailing '.' or ',' ends the sentence, not the path.
names   Every span in backticks (outside ``` blocks) of one of these forms must resolve:
          `python -m X`           X is an importable module;
          `PYCCL_X` (`=value`)    declared in pyccl.settings;
          `pyccl.a.b`             the longest importable prefix, then getattr for the rest;
          `mod.a.b`               mod the last part of a pyccl module's name (`tuner`,
                                  `cost`, `select`, ...): resolves in one of the modules of
                                  that name;
          `Class.attr`            Class a class defined at top level in the package; attr
                                  found on it (getattr, or an instance attribute: a
                                  `self.attr = ...` in its or a base's methods, or a field);
          `CamelCase`, `ALL_CAPS` defined at top level in the package or in a .py file the
                                  page names (`LAYERS` of tests/test_layers.py);
        other spans (`comm.all_reduce(x)`, `in`, `name`, code with spaces or brackets) are
        not names. A name written next to a file (`name` (`file`), `name` in `file`,
        `name`, `file`, or `file` (`name`) and `file`'s `name`) must be defined in that file:
        a .py file's module resolves it, another file (C, CUDA) contains it as a word.
engines The table under "## The engines" has a row (first cell `name`) for every engine of
        the registry, in the registry's order (Communicator._make_engines, read from its
        source), and for every EngineBase subclass with a name of its own in pyccl.engines.
"""
import ast
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "ARCHITECTURE.md")
FOLDERS = ("ccl", "transports", "topology", "native", "tests", "bench", "docs", "examples")
PACKAGE = {"ccl": "pyccl", "transports": "pyccl.transports", "topology": "pyccl.topology"}

with open(DOC, encoding="utf-8") as _f:
    TEXT = _f.read()
PROSE = re.sub(r"```.*?```", "", TEXT, flags=re.S)          # backticks inside ``` blocks are not spans
SPANS = re.findall(r"`([^`\n]+)`", PROSE)

PATH_RE = re.compile(r"(?<![\w./~<>-])((?:%s)/[\w./<>*-]*)" % "|".join(FOLDERS))
NAME_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
FILE = r"(?:%s)/[\w./-]+\.\w+" % "|".join(FOLDERS)
#: `name` (`file`  /  `name` in `file`  /  `name`, `file`
NAME_THEN_FILE = re.compile(r"`(%s)`(?:\s*\(\s*|\s+in\s+|,\s*)`(%s)`" % (NAME_RE.pattern, FILE))
#: `file` (`name`  /  `file`'s `name`
FILE_THEN_NAME = re.compile(r"`(%s)`(?:\s*\(\s*|'s\s+)`(%s)`" % (FILE, NAME_RE.pattern))


# ---- the package, as files and as modules ----------------------------------------------------------
def _package_files() -> dict:
    """{module name: path} of every .py file of the package."""
    out = {}
    for folder, pkg in PACKAGE.items():
        top = os.path.join(REPO, folder)
        for dirpath, dirnames, files in os.walk(top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, top)
            here = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            for f in files:
                if f == "__init__.py":
                    out[here] = os.path.join(dirpath, f)
                elif f.endswith(".py"):
                    out[f"{here}.{f[:-3]}"] = os.path.join(dirpath, f)
    return out


MODULES = _package_files()
BY_PATH = {os.path.relpath(p, REPO): m for m, p in MODULES.items()}
BASENAMES = {}
for _m in MODULES:
    BASENAMES.setdefault(_m.rsplit(".", 1)[-1], []).append(_m)


def _top_level(path) -> dict:
    """{name: kind} defined at the top level of a .py file (class, def, assignment, import)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names[node.name] = "class"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = "def"
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        names[n.id] = "value"
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                names[(a.asname or a.name).split(".")[0]] = "import"
    return names


TOP = {m: _top_level(p) for m, p in MODULES.items()}
#: .py files outside the package the page names (tests, docs, bench): their top-level names count
NAMED_PY = sorted({p.rstrip(".,") for p in PATH_RE.findall(TEXT)
                   if p.endswith(".py") and not p.startswith(tuple(PACKAGE)) and os.path.isfile(os.path.join(REPO, p))})
OUTSIDE = {p: _top_level(os.path.join(REPO, p)) for p in NAMED_PY}


def _defined(name: str, kinds=("class", "def", "value")) -> list:
    """Modules (or named files) that define `name` at top level (imports do not count)."""
    found = [m for m, names in TOP.items() if names.get(name) in kinds]
    return found + [p for p, names in OUTSIDE.items() if names.get(name) in kinds]


def _import(module: str):
    """The module, or None when a third-party import it needs is missing (torch, cupy)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == "pyccl" or e.name.startswith("pyccl.")):
            raise
        return None


def _instance_attr(cls, attr: str) -> bool:
    """`attr` is set on instances of `cls`: `self.attr = ...` in a method of it or a pyccl
    base, or a field (annotation)."""
    for c in cls.__mro__:
        if attr in getattr(c, "__annotations__", {}):
            return True
        if not c.__module__.startswith("pyccl"):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(c)))
        except (OSError, TypeError):
            continue
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Attribute) and n.attr == attr and isinstance(n.value, ast.Name) \
                            and n.value.id == "self":
                        return True
    return False


def _resolve_in(module: str, attrs: list) -> bool:
    """`module`.attrs[0].attrs[1]... exists."""
    if not attrs:
        return True
    mod = _import(module)
    if mod is None:                       # needs torch or cupy: the file's top level, by its source
        return attrs[0] in TOP.get(module, {}) and len(attrs) == 1
    obj = mod
    for i, a in enumerate(attrs):
        if hasattr(obj, a):
            obj = getattr(obj, a)
            continue
        sub = f"{getattr(obj, '__name__', '')}.{a}"
        if inspect.ismodule(obj) and sub in MODULES:
            return _resolve_in(sub, attrs[i + 1:])
        return inspect.isclass(obj) and i == len(attrs) - 1 and _instance_attr(obj, a)
    return True


def _resolve_pyccl(dotted: str) -> bool:
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        mod = ".".join(parts[:n])
        try:
            spec = importlib.util.find_spec(mod)
        except ModuleNotFoundError:
            spec = None
        if spec is not None:
            return _resolve_in(mod, parts[n:])
    return False


def resolve(span: str):
    """True/False for a name the page gives, None for a span that is no name (not checked)."""
    if span.startswith("python -m "):
        mod = span.split()[2]
        try:
            return importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:
            return False
    m = re.fullmatch(r"(PYCCL_[A-Z0-9_]+)(=.*)?", span)
    if m:
        from pyccl import settings
        return settings.declared(m.group(1)) is not None
    if not NAME_RE.fullmatch(span):
        return None
    parts = span.split(".")
    head = parts[0]
    if head == "pyccl":
        return _resolve_pyccl(span)
    if len(parts) > 1 and head in BASENAMES:
        return any(_resolve_in(m, parts[1:]) for m in BASENAMES[head])
    if head[0].isupper():
        camel = any(c.islower() for c in head)
        where = _defined(head, ("class",) if camel and len(parts) > 1 else ("class", "def", "value"))
        if len(parts) == 1:
            return bool(where)
        return any(w in MODULES and _resolve_in(w, parts) for w in where)
    return None


def _in_file(name: str, path: str) -> bool:
    """`name` is defined in the file `path` (relative to the repository)."""
    full = os.path.join(REPO, path)
    if not os.path.isfile(full):
        return False
    if path.endswith(".py"):
        mod = BY_PATH.get(path)
        parts = name.split(".")
        if mod is not None:
            if parts[0] in BASENAMES and len(parts) > 1 and mod in BASENAMES[parts[0]]:
                parts = parts[1:]            # `cost.walk` next to topology/cost.py
            return parts[0] in TOP[mod] and _resolve_in(mod, parts)
        return parts[0] in _top_level(full)
    with open(full, encoding="utf-8", errors="replace") as f:
        return re.search(r"\b%s\b" % re.escape(name.split(".")[-1]), f.read()) is not None


# ---- the checks ---------------------------------------------------------------------------------------
def test_the_page_is_read():
    """A guard on the checks below: they see the page's paths, names and table."""
    assert len(PATH_RE.findall(TEXT)) > 40 and len(SPANS) > 150
    assert "## The engines" in TEXT
    assert sum(resolve(s) is not None for s in SPANS) > 100


def test_every_path_exists():
    missing = []
    for token in PATH_RE.findall(TEXT):
        if "<" in token or "*" in token:
            continue                          # a recipe's placeholder: transports/<name>.py
        path = token.rstrip(".,")
        if not os.path.exists(os.path.join(REPO, path)):
            missing.append(path)
    assert not missing, "docs/ARCHITECTURE.md names paths that do not exist:\n" + "\n".join(sorted(set(missing)))


def test_every_name_resolves():
    wrong = sorted({s for s in SPANS if resolve(s) is False})
    assert not wrong, ("docs/ARCHITECTURE.md names what the code does not define (rules: this file's "
                       "docstring):\n" + "\n".join(wrong))


def test_names_next_to_files_are_in_those_files():
    pairs = [(n, p) for n, p in NAME_THEN_FILE.findall(PROSE)] + [(n, p) for p, n in FILE_THEN_NAME.findall(PROSE)]
    assert len(pairs) > 10
    wrong = sorted({f"`{n}` is not defined in {p}" for n, p in pairs if not _in_file(n, p)})
    assert not wrong, "docs/ARCHITECTURE.md places names in the wrong file:\n" + "\n".join(wrong)


# ---- the engines ------------------------------------------------------------------------------------
def _engine_classes() -> dict:
    """{class name: class} of every EngineBase subclass in pyccl.engines (imported)."""
    from pyccl.engines import base
    import pyccl.engines as pkg
    found = {}
    for info in pkgutil.walk_packages(pkg.__path__, "pyccl.engines."):
        mod = _import(info.name)
        if mod is None:
            continue
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, base.EngineBase) and obj is not base.EngineBase:
                found[name] = obj
    return found


def registry_classes() -> list:
    """The class names of Communicator._make_engines' list, in order, read from its source."""
    with open(MODULES["pyccl.communicator"], encoding="utf-8") as f:
        tree = ast.parse(f.read())
    comm = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Communicator")
    methods = {n.name: n for n in comm.body if isinstance(n, ast.FunctionDef)}
    make = methods["_make_engines"]

    def made_by(call):
        """The class a call makes: Class(...) or self.method(...) that returns Class(...)."""
        if isinstance(call.func, ast.Name):
            return call.func.id
        if isinstance(call.func, ast.Attribute) and call.func.attr in methods:
            for node in ast.walk(methods[call.func.attr]):
                if isinstance(node, ast.Return) and isinstance(node.value, ast.Call) and \
                        isinstance(node.value.func, ast.Name):
                    return node.value.func.id
        return None

    assigned = {}
    for node in ast.walk(make):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    assigned[t.id] = made_by(node.value)
    listed = max((n for n in ast.walk(make) if isinstance(n, ast.List)), key=lambda n: len(n.elts))
    out = []
    for e in listed.elts:
        name = made_by(e) if isinstance(e, ast.Call) else assigned.get(e.id) if isinstance(e, ast.Name) else None
        assert name, f"Communicator._make_engines: cannot tell which engine {ast.unparse(e)} is"
        out.append(name)
    return out


def table_engines() -> list:
    section = TEXT.split("## The engines", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\|\s*`(\w+)`\s*\|", section, flags=re.M)


def test_the_engines_table_lists_the_registry_in_order():
    classes = _engine_classes()
    registry = []
    for cls_name in registry_classes():
        assert cls_name in classes, f"{cls_name} (in Communicator._make_engines) is no EngineBase subclass"
        registry.append(classes[cls_name].name)
    table = table_engines()
    missing = [n for n in registry if n not in table]
    assert not missing, f"engines of the registry missing from docs/ARCHITECTURE.md's table: {missing}"
    assert [n for n in table if n in registry] == registry, \
        f"docs/ARCHITECTURE.md's engine table is not in the registry's order {registry}: {table}"


def test_every_engine_class_is_in_the_table():
    from pyccl.engines.base import EngineBase
    names = {cls.name for cls in _engine_classes().values() if cls.name != EngineBase.name}
    missing = sorted(names - set(table_engines()))
    assert not missing, f"engines (EngineBase subclasses with a name) missing from docs/ARCHITECTURE.md: {missing}"


@pytest.mark.parametrize("span, ok", [
    ("pyccl.tuner.COMPOSED_MARGIN", True), ("tuner.no_such_thing", False), ("Call.kind", True),
    ("CallQueue.inflight", True), ("CallQueue.nothing_here", False), ("NoSuchClass", False),
    ("comm.all_reduce(x)", None), ("PYCCL_ENGINE=<name>", True), ("PYCCL_NO_SUCH", False),
    ("python -m pyccl.tune", True), ("python -m pyccl.nope", False), ("SetupContext.secret", True),
])
def test_the_rules(span, ok):
    assert resolve(span) is ok
