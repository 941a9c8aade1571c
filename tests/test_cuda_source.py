"""The CUDA kernels' source, checked without a GPU: the files kernels.py joins into one
translation unit (ccl/engines/cuda/kernels*.cu, split only to keep files short) define every
kernel it launches exactly once, split at top level, and ship as package data.
(tests/test_cuda.py compiles and runs them where a GPU is.)"""
import os
import re

import pytest

from pyccl.engines.cuda import kernel_cache, kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = re.compile(r'(extern "C" )?__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\s*\(')


def _code(text):
    """The text without comments (a naive scan: the .cu has no quote inside a comment)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _kernels(text):
    """{name: [extern_c, ...]} of every __global__ definition."""
    out = {}
    for m in KERNEL.finditer(_code(text)):
        out.setdefault(m.group(2), []).append(bool(m.group(1)))
    return out


def test_source_is_the_parts_in_order():
    texts = []
    for path in kernels._CU_PARTS:
        assert os.path.isfile(path), path
        with open(path) as f:
            texts.append(f.read())
    assert [os.path.basename(p) for p in kernels._CU_PARTS][0] == "kernels.cu"
    assert kernels.cuda_source() == "".join(texts)
    for path, text in zip(kernels._CU_PARTS, texts):
        assert text.endswith("\n"), f"{path} must end with a newline (the parts are joined as they are)"


@pytest.mark.parametrize("index", range(len(kernels._CU_PARTS)))
def test_each_part_is_cut_at_top_level(index):
    """Braces and parentheses balance inside every part: no definition spans two files."""
    with open(kernels._CU_PARTS[index]) as f:
        code = _code(f.read())
    assert code.count("{") == code.count("}")
    assert code.count("(") == code.count(")")


def test_every_launched_kernel_is_defined_once():
    found = _kernels(kernels.cuda_source())
    twice = {k: v for k, v in found.items() if len(v) != 1}
    assert not twice, f"kernels defined more than once: {twice}"
    assert set(kernels._PARAMS) <= set(found), set(kernels._PARAMS) - set(found)
    # the engine fetches some by plain name (extern "C": kernel_cache.COMMON), the rest as
    # template instances (kernel_cache.KINDS)
    plain, templates = set(kernel_cache.COMMON), set(kernel_cache.KINDS)
    assert plain and templates and not plain & templates
    assert plain | templates == set(kernels._PARAMS)
    for name in plain:
        assert found[name] == [True], f"{name} is fetched by plain name, so it must be extern \"C\""
    for name in templates:
        assert found[name] == [False], f"{name} is fetched as a template instance"


def test_common_kernels_build_alone():
    """Each extern "C" kernel sits under #if KERNELS_COMMON || defined(KERNEL_ONLY_<name>), so a
    caller can build just the one it needs (build.py) and a (dtype, op) unit builds none."""
    code = _code(kernels.cuda_source())
    for name in kernel_cache.COMMON:
        assert re.search(r"#if KERNELS_COMMON \|\| defined\(KERNEL_ONLY_" + name + r'\)\nextern "C"', code), name
    assert code.count("#if KERNELS_COMMON") == len(kernel_cache.COMMON)


def test_names_the_engine_launches_have_parameter_blocks():
    """Every kernel name reductions.py, copies.py and kernels.py look up has an entry in _PARAMS."""
    here = os.path.dirname(kernels.__file__)
    names = set()
    for mod in ("kernels.py", "reductions.py", "copies.py"):
        with open(os.path.join(here, mod)) as f:
            text = f.read()
        names |= set(re.findall(r'_common\("(\w+)"\)', text))
        names |= set(re.findall(r'_kernel\("(\w+)"', text))
    assert names and names <= set(kernels._PARAMS), names - set(kernels._PARAMS)


def test_flag_layout_agrees_with_python():
    """MAXR, MAXB and the flag buffer size in the .cu agree with kernels.py."""
    defines = dict(re.findall(r"^#define (\w+) (.+)$", _code(kernels.cuda_source()), flags=re.M))
    env = {}
    for name, expr in defines.items():
        env[name] = eval(expr.strip(), {}, dict(env))
    assert env["MAXR"] == kernels.MAXR and env["MAXB"] == kernels.MAXB
    assert env["OFF_RC"] + env["MAXB"] * env["MAXR"] * 2 == kernels.FLAG_WORDS


def test_parts_are_package_data():
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["pyccl.engines.cuda"]
    assert set(os.path.basename(p) for p in kernels._CU_PARTS) <= set(data)
    assert "prebuilt/index.json" in data and "prebuilt/*/*.bin" in data      # setup.py's cubins, where built
