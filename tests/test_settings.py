"""pyccl.settings: every PYCCL_* variable declared once, the README table generated from it,
and nothing outside it reading one from the environment."""
import ast
import pathlib
import re

import pytest

from pyccl import env, settings
from pyccl.errors import InvalidArgument

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ("ccl", "transports", "topology")
NAME = re.compile(r"PYCCL_[A-Z0-9_]*[A-Z0-9_]")
#: PYCCL_* names in Python source that are not environment variables: native/shm.h's codes
#: and the C include guards and macros mentioned in comments.
NOT_SETTINGS = {"PYCCL_COLL_", "PYCCL_COLL_ALL_REDUCE", "PYCCL_VERBS_MODULE", "PYCCL_SUM", "PYCCL_SHM_OK"}


def _sources():
    for top in PACKAGE:
        yield from sorted((ROOT / top).rglob("*.py"))
    yield from sorted((ROOT / "native").glob("build*.py"))


def _rel(path):
    return path.relative_to(ROOT).as_posix()


def test_readme_table_is_generated():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- settings:begin -->\n(.*?)<!-- settings:end -->", text, re.S)
    assert m, "README.md lacks the <!-- settings:begin --> / <!-- settings:end --> markers"
    assert m.group(1) == settings.markdown(), (
        "README.md's environment table differs from pyccl.settings: regenerate it with "
        "`python -m pyccl.settings --markdown`")


def test_every_name_in_the_source_is_declared():
    missing = {}
    for path in _sources():
        for name in NAME.findall(path.read_text()):
            if name in NOT_SETTINGS:
                continue
            # f"PYCCL_ALPHA_{key}" leaves "PYCCL_ALPHA_": a family's prefix
            ok = settings.declared(name) or any(s.prefix == name for s in settings.SETTINGS.values())
            if not ok:
                missing.setdefault(name, _rel(path))
    assert not missing, f"PYCCL_* names used but not declared in ccl/settings.py: {missing}"


def _literal_name(node):
    """'PYCCL_...' when `node` is a string (or f-string) starting with PYCCL_, else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("PYCCL_"):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant) \
            and str(node.values[0].value).startswith("PYCCL_"):
        return node.values[0].value + "{}"
    return None


def _private_reads(tree):
    """(line, name) of every read of a PYCCL_* name from a mapping: X.get("PYCCL_.."),
    os.getenv("PYCCL_.."), X["PYCCL_.."] (not an assignment).  Writes such as
    env["PYCCL_RANK"] = ... (the launcher setting its children's variables) are allowed."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args \
                and node.func.attr in ("get", "getenv", "pop", "setdefault"):
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id == "settings" or \
                    isinstance(owner, ast.Attribute) and owner.attr == "settings":
                continue
            name = _literal_name(node.args[0])
            if name:
                yield node.lineno, name
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            name = _literal_name(node.slice)
            if name:
                yield node.lineno, name


def test_no_private_environment_readers():
    found = []
    for path in _sources():
        rel = _rel(path)
        if rel == "ccl/settings.py":
            continue
        for line, name in _private_reads(ast.parse(path.read_text(), rel)):
            found.append(f"{rel}:{line} {name}")
    assert not found, "read these through pyccl.settings.get():\n" + "\n".join(found)


def test_the_scan_sees_reads():
    src = 'import os\nos.environ.get("PYCCL_X")\nos.getenv("PYCCL_Y", "1")\ne[f"PYCCL_BW_{k}"]\n' \
          'env["PYCCL_RANK"] = "0"\nsettings.get("PYCCL_TIMEOUT")\n'
    assert [n for _, n in _private_reads(ast.parse(src))] == ["PYCCL_X", "PYCCL_Y", "PYCCL_BW_{}"]


def test_declarations_are_complete():
    for s in settings.SETTINGS.values():
        assert s.type in settings.TYPES, s.name
        assert s.section in settings.SECTIONS, s.name
        assert s.meaning and "\n" not in s.meaning, s.name
        assert (s.type == "choice") == bool(s.choices), s.name
        if s.type == "choice":
            assert s.default in s.choices, s.name
        if s.default is None:
            assert s.shown or s.type == "str", f"{s.name}: say how the default is computed"


def test_get_parses_and_defaults():
    assert settings.get("PYCCL_CHUNK_BYTES", {}) == 1 << 20
    assert settings.get("PYCCL_CHUNK_BYTES", {"PYCCL_CHUNK_BYTES": "  "}) == 1 << 20
    assert settings.get("PYCCL_CHUNK_BYTES", {"PYCCL_CHUNK_BYTES": "4MiB"}) == 4 << 20
    assert settings.get("PYCCL_CHUNK_BYTES", {"PYCCL_CHUNK_BYTES": "64k"}) == 64 << 10
    assert settings.get("PYCCL_CHUNK_BYTES", {"PYCCL_CHUNK_BYTES": "0x100"}) == 256
    assert settings.get("PYCCL_TIMEOUT", {"PYCCL_TIMEOUT": "2.5"}) == 2.5
    assert settings.get("PYCCL_CHECK", {"PYCCL_CHECK": "1"}) is True
    assert settings.get("PYCCL_NATIVE", {"PYCCL_NATIVE": "0"}) is False
    assert settings.get("PYCCL_NATIVE", {}) is True
    assert settings.get("PYCCL_CUDA_COPY", {"PYCCL_CUDA_COPY": "Staged"}) == "staged"
    assert settings.get("PYCCL_BW_TCP", {"PYCCL_BW_TCP": "3"}) == 3.0
    assert settings.get("PYCCL_BW_TCP", {}) is None
    assert settings.get("PYCCL_ALGO", {"PYCCL_ALGO": " ring "}) == "ring"
    assert settings.is_set("PYCCL_ALGO", {"PYCCL_ALGO": "ring"})
    assert not settings.is_set("PYCCL_ALGO", {"PYCCL_ALGO": ""})


def test_get_reads_the_environment_at_call_time(monkeypatch):
    monkeypatch.setenv("PYCCL_TCP_SOCKETS", "5")
    assert settings.get("PYCCL_TCP_SOCKETS") == 5
    monkeypatch.delenv("PYCCL_TCP_SOCKETS")
    assert settings.get("PYCCL_TCP_SOCKETS") == 2


@pytest.mark.parametrize("name, value", [
    ("PYCCL_CHUNK_BYTES", "lots"), ("PYCCL_TCP_SOCKETS", "2.5"), ("PYCCL_TIMEOUT", "soon"),
    ("PYCCL_CHECK", "maybe"), ("PYCCL_CUDA_COPY", "teleport"), ("PYCCL_IB_QPS", "65"),
    ("PYCCL_BW_TCP", "fast"),
])
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(InvalidArgument, match=re.escape(name) + ".*" + re.escape(value)):
        settings.get(name, {name: value})


def test_undeclared_names_raise():
    with pytest.raises(InvalidArgument, match="PYCCL_NO_SUCH_THING"):
        settings.get("PYCCL_NO_SUCH_THING", {})
    with pytest.raises(InvalidArgument, match="PYCCL_NO_SUCH_THING"):
        settings.is_set("PYCCL_NO_SUCH_THING", {})


def test_env_helpers_follow_the_registry():
    assert env.env_int("PYCCL_CHUNK_BYTES", 7, {}) == 7                  # the caller's default stands in
    assert env.env_int("PYCCL_CHUNK_BYTES", 7, {"PYCCL_CHUNK_BYTES": "1M"}) == 1 << 20
    assert env.env_int("PYCCL_REPRODUCIBLE", 0, {"PYCCL_REPRODUCIBLE": "1"}) == 1
    assert env.DEFAULT_TIMEOUT == settings.get("PYCCL_TIMEOUT", {})


def test_markdown_lists_every_setting():
    table = settings.markdown()
    for name in settings.SETTINGS:
        assert f"| `{name}` |" in table
