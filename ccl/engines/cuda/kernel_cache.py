"""What the kernels are, how a built image is named, and where built images are kept.

Why units: NVRTC spends ~0.3 s on one template kernel and ~70 s on all of them (2-core VM), so
the kernels are built in *units*: ``common`` (the five extern "C" kernels), one unit per
(dtype, op) with its four reducing kinds x two vector widths, and single kernels (``one:...``)
for a caller that cannot wait for its unit. A unit's image is a cubin (or PTX) plus the lowered
names of its kernels, kept

* in the package (``prebuilt/``, written by setup.py where a CUDA toolkit is present), valid
  while the source hash matches; and
* on disk (``PYCCL_KERNEL_CACHE``, default ``~/.cache/pyccl/kernels``), in a folder keyed by
  the source hash, the compile options, the target architecture and the NVRTC version, one
  file per unit written atomically (ranks of one host share it; a torn file is never read).
Pure Python: no CUDA here (tests/test_kernel_cache.py runs on any machine), and no import of
the package at module level: setup.py loads this file alone to build the prebuilt cubins.
"""
import hashlib
import json
import os
import struct
import tempfile

#: the kernels' source, one translation unit in three files read in this order (kernels.cu: the
#: flag layout, waits, epochs, element types; kernels_reduce.cu: one-shot, two-shot, pull
#: two-shot; kernels_copy.cu: SM copies, the copy-engine reduction, the barrier, the copy
#: collectives through the scratch, all-to-all), split only to keep files short
PARTS = ("kernels.cu", "kernels_reduce.cu", "kernels_copy.cu")
#: bumped when the image format or the unit layout changes (part of every key)
FORMAT = 1
KINDS = ("oneshot", "twoshot", "reduce_n", "twoshot_pull")
COMMON = ("copy_n", "barrier", "staged", "alltoallv", "alltoallv_staged")
CTYPE = {"float16": "f16_t", "bfloat16": "bf16_t", "float32": "float", "float64": "double",
         "int8": "signed char", "uint8": "unsigned char", "int32": "int", "int64": "long long",
         "bool": "unsigned char"}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int8": 1, "uint8": 1, "int32": 4,
            "int64": 8, "bool": 1}
OPTIONS = ("-std=c++17",)
#: the background build's order: the common kernels, then sums of the usual dtypes first
PRIORITY = ("float32", "bfloat16", "float16", "int32", "int64", "float64", "int8", "uint8", "bool")


def opcodes(dtype):
    """Ops with a kernel of their own (AVG is SUM with a divide; bool: or = max, and = min)."""
    return (2, 3) if dtype == "bool" else (0, 1, 2, 3)


def kernel_name(kind, dtype, opcode, n) -> str:
    """The name expression NVRTC instantiates, e.g. ``oneshot<bf16_t, 0, 8>``."""
    return f"{kind}<{CTYPE[dtype]}, {opcode}, {n}>"


def unit_of(key) -> str:
    """The unit that holds kernel `key`: (kind, dtype, opcode, n) or a common kernel's name."""
    if isinstance(key, str):
        return "common"
    return f"{key[1]}-{key[2]}"


def single_of(key) -> str:
    """The one-kernel unit of `key` (what a caller builds in the foreground)."""
    if isinstance(key, str):
        return f"one:{key}"
    return "one:" + "-".join(map(str, key))


def all_units() -> list:
    """Every unit, in the background build's order."""
    return ["common"] + [f"{d}-{o}" for o in (0, 3, 2, 1) for d in PRIORITY if o in opcodes(d)]


def unit_source(unit):
    """(name expressions, extra options, plain names) that build `unit`."""
    if unit == "common":
        return [], ["-DKERNELS_COMMON=1"], list(COMMON)
    if unit.startswith("one:"):
        parts = unit[4:].split("-")
        if len(parts) == 1:
            return [], [f"-DKERNEL_ONLY_{parts[0]}=1"], [parts[0]]
        kind, dtype, opcode, n = parts
        return [kernel_name(kind, dtype, int(opcode), int(n))], [], []
    dtype, opcode = unit.rsplit("-", 1)
    vec = 16 // ITEMSIZE[dtype]
    return [kernel_name(k, dtype, int(opcode), v) for k in KINDS for v in sorted({1, vec})], [], []


def read_source(folder: str = os.path.dirname(__file__)) -> str:
    """The parts joined in order: what NVRTC compiles."""
    out = []
    for name in PARTS:
        with open(os.path.join(folder, name)) as f:
            out.append(f.read())
    return "".join(out)


def source_hash(source: str) -> str:
    return hashlib.sha256(f"{FORMAT}|{' '.join(OPTIONS)}|".encode() + source.encode()).hexdigest()[:16]


def cache_key(source: str, target: str, nvrtc_version) -> str:
    """The folder name of one build configuration: source (and options, format), target
    ('sm_90', or 'compute_90' for PTX) and the NVRTC version that compiles it."""
    return f"{source_hash(source)}-{target}-nvrtc{nvrtc_version[0]}.{nvrtc_version[1]}"


def cache_root():
    """PYCCL_KERNEL_CACHE, else $XDG_CACHE_HOME/pyccl/kernels, else ~/.cache/pyccl/kernels;
    None when PYCCL_KERNEL_CACHE is 0 or off (no disk cache)."""
    from ... import settings
    v = settings.get("PYCCL_KERNEL_CACHE")
    if v in ("0", "off", "none"):
        return None
    if v:
        return v
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pyccl", "kernels")


def pack(image: bytes, names: dict) -> bytes:
    """One file: [u32 length of the JSON][JSON {name expression: lowered name}][image]."""
    meta = json.dumps(names, sort_keys=True).encode()
    return struct.pack("<I", len(meta)) + meta + image


def unpack(blob: bytes):
    """(image, names) of a packed file; ValueError when it is not one."""
    if len(blob) < 4:
        raise ValueError("short kernel file")
    (n,) = struct.unpack_from("<I", blob)
    if 4 + n > len(blob):
        raise ValueError("truncated kernel file")
    names = json.loads(blob[4:4 + n])
    image = blob[4 + n:]
    if not image:
        raise ValueError("kernel file without an image")
    return image, names


class DiskCache:
    """Unit images of one key in one folder. Writes go to a temporary file renamed into place,
    so concurrent writers (ranks of a host) and readers never see a partial file. Reads that
    fail (missing, torn by another tool, unreadable) are misses; writes that fail (read-only
    home) are logged by the caller and skipped."""

    def __init__(self, root: str, key: str):
        self.dir = os.path.join(root, key)

    def path(self, unit: str) -> str:
        return os.path.join(self.dir, unit.replace(":", "_") + ".bin")

    def get(self, unit: str):
        try:
            with open(self.path(unit), "rb") as f:
                return unpack(f.read())
        except (OSError, ValueError):
            return None

    def put(self, unit: str, image: bytes, names: dict) -> str:
        os.makedirs(self.dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pack(image, names))
            os.replace(tmp, self.path(unit))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return self.path(unit)

    def units(self) -> list:
        try:
            return sorted(n[:-4].replace("_", ":", 1) if n.startswith("one_") else n[:-4]
                          for n in os.listdir(self.dir) if n.endswith(".bin"))
        except OSError:
            return []

    # -- claims: ranks of one host split the background build instead of each doing all of it
    def claim(self, unit: str, stale_s: float = 120.0) -> bool:
        """True when this process may build `unit` now: it created the claim file, or the one
        there is older than `stale_s` (its builder died) and was taken over."""
        os.makedirs(self.dir, exist_ok=True)
        path = self.path(unit) + ".claim"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                import time
                with open(path) as f:
                    text = f.read().strip()
                young = time.time() - os.stat(path).st_mtime < stale_s
                if young and (not text or _alive(int(text))):   # empty: its maker is writing its pid now
                    return False
                with open(path, "w") as f:          # taken over: its builder died or hung
                    f.write(str(os.getpid()))
                return True
            except (OSError, ValueError):
                return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True

    def release(self, unit: str):
        try:
            os.unlink(self.path(unit) + ".claim")
        except OSError:
            pass


def _alive(pid: int) -> bool:
    """Whether process `pid` (of this host: the cache is a local folder) still runs."""
    if pid <= 0:
        return True                            # unknown: trust the age
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


PREBUILT = os.path.join(os.path.dirname(__file__), "prebuilt")


def prebuilt_target(arch: int, root: str = PREBUILT, source: str = None):
    """(folder, target) of the package's prebuilt cubins that run on sm_`arch`: the newest built
    architecture of the same major version not above it (cubins run on later minors), or None.
    Only when the index's source hash is this source's (an edited tree ignores them)."""
    try:
        with open(os.path.join(root, "index.json")) as f:
            index = json.load(f)
    except (OSError, ValueError):
        return None
    if source is not None and index.get("source") != source_hash(source):
        return None
    fits = [a for a in index.get("archs", []) if a // 10 == arch // 10 and a <= arch]
    if not fits:
        return None
    a = max(fits)
    return os.path.join(root, f"sm_{a}"), f"sm_{a}"
