"""Calibrate the tuner's cost model on this host: `python -m pyccl.tune`.

The tuner (ccl/tuner.py) prices every algorithm with per-transport alpha (seconds per
message), beta (seconds per byte) and gamma (seconds per reduced byte), topology/cost.py.
Without a profile they are round guesses. This module measures them through the engine the
tuner plans for (the executor, driven from Python), so that the model's numbers are the
engine's numbers:

  gamma  reduce_into (float32 SUM, the C kernel) over 1 MiB blocks, in this process
  alpha  a forced-ring all_reduce of 8 bytes between 2 local ranks over the transport is
         2 messages in the model: alpha = t(8 B) / 2
  beta   the same at 4 MiB (2 steps of 2 MiB, chunked at 1 MiB): t = 4 alpha + 2 (2 MiB) beta
         + (2 MiB) gamma, solved for beta

for each transport that two processes of one host can use: shm (the slot rings; the
shared-memory collectives are switched off for the probe) and tcp (over loopback; between
hosts the wire is usually slower: measure there, or set PYCCL_BW_TCP). And `shm_engine`, the
shared-memory C collectives that run the node-local phases of a composed multi-host
collective: one call per phase, so its alpha is a whole 8-byte all_reduce (a few us, where the
slot rings pay ~20 us per message from Python), and at 4 MiB t = alpha + 2 (2 MiB) beta +
(2 MiB) gamma (reduce-scatter, then all-gather). Each figure is the
median of --iters timed calls; --repeat runs take the median of the runs.

The profile is JSON, cached per host under ~/.cache/pyccl/tune-<hostname>.json
(PYCCL_TUNE_PROFILE=path reads and writes another file; =off ignores profiles). A
communicator takes rank 0's profile (shared at set-up with the rank information, no extra
store request) so every rank prices alike and picks the same plan; PYCCL_ALPHA_<T>,
PYCCL_BW_<T>, PYCCL_REDUCE_BW_<T> still override single numbers.

    python -m pyccl.tune                  # measure shm and tcp, write the profile
    python -m pyccl.tune --show           # the numbers the tuner uses now, and from where
"""
import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from pyccl.topology.cost import SHM_ENGINE as ENGINE   # the node-local C collectives' cost entry
# reading a profile lives below its users (topology/profile.py, cost.py); named here as before
from pyccl.topology.cost import measured_costs  # noqa: F401
from pyccl.topology.profile import FIELDS, load, profile_path  # noqa: F401

log = logging.getLogger("pyccl")

PROBE_TRANSPORTS = ("shm", "tcp", ENGINE)    # ENGINE: probed over shm with the C collectives on
SMALL, LARGE, CHUNK = 8, 4 << 20, 1 << 20


def save(transports: dict, path: str, extra=None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = {"host": socket.gethostname(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "how": "python -m pyccl.tune (see ccl/tune.py)", "transports": transports, **(extra or {})}
    tmp = path + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


# ---- measuring ----------------------------------------------------------------------------------
def reduce_gbs(iters=50) -> float:
    """GB/s of the C reduction (float32 SUM) over 1 MiB blocks, as the executor reduces chunks."""
    from .dtypes import SUM
    from .reduce import reduce_into
    a = np.ones(CHUNK // 4, np.float32)
    b = np.ones_like(a)
    out = np.empty_like(a)
    for _ in range(5):
        reduce_into(out, a, b, SUM)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        reduce_into(out, a, b, SUM)
        times.append(time.perf_counter() - t0)
    return CHUNK / float(np.median(times)) / 1e9


def _time_all_reduce(comm, nbytes, iters, warmup=3) -> float:
    """Median seconds of one all_reduce of nbytes (float32), the slower rank's time per call."""
    x = np.ones(max(1, nbytes // 4), np.float32)
    times = []
    for i in range(warmup + iters):
        comm.barrier()
        t0 = time.perf_counter()
        comm.all_reduce(x)
        t = np.array([time.perf_counter() - t0])
        comm.all_reduce(t, op="max")
        if i >= warmup:
            times.append(float(t[0]))
    return float(np.median(times))


def fit(t_small: float, t_large: float, gamma_gbs: float) -> dict:
    """alpha and bandwidth from the two ring all_reduce times (2 ranks; see the docstring)."""
    alpha = t_small / 2
    b = LARGE / 2
    msgs = 2 * -(-b // CHUNK)
    beta = (t_large - msgs * alpha - b / (gamma_gbs * 1e9)) / (2 * b)
    beta = max(beta, 1e-12)                       # a fast link under a noisy minute: stay positive
    return {"alpha_us": alpha * 1e6, "bw_gbs": 1.0 / beta / 1e9, "reduce_gbs": gamma_gbs}


def fit_engine(t_small: float, t_large: float, gamma_gbs: float) -> dict:
    """alpha and bandwidth of the node-local engine from its 2-rank all_reduce times: one call
    each, alpha = t(8 B); t(4 MiB) = alpha + 2 b beta + b gamma with b = 2 MiB."""
    b = LARGE / 2
    beta = max((t_large - t_small - b / (gamma_gbs * 1e9)) / (2 * b), 1e-12)
    return {"alpha_us": t_small * 1e6, "bw_gbs": 1.0 / beta / 1e9, "reduce_gbs": gamma_gbs}


def _worker(args) -> int:
    """One rank of the probe (started by pyccl.launch with the transport forced)."""
    import pyccl
    with pyccl.init() as comm:
        t_small = _time_all_reduce(comm, SMALL, args.iters)
        t_large = _time_all_reduce(comm, LARGE, max(3, args.iters // 4))
        if comm.rank == 0:
            with open(args.out, "w") as f:
                json.dump({"t_small": t_small, "t_large": t_large, "transport": comm.transport_name}, f)
    return 0


def probe(transport: str, iters: int, timeout: float = 120) -> dict:
    """Start 2 local ranks over `transport`; their ring all_reduce times {t_small, t_large}."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "probe.json")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYCCL_ALGO", "PYCCL_CHUNK_BYTES"))}
        env["PYCCL_TUNE_PROFILE"] = "off"
        if transport == ENGINE:
            env.update(PYCCL_TRANSPORT="shm", PYCCL_SHM_COLLECTIVES="1")
        else:
            env.update(PYCCL_TRANSPORT=transport, PYCCL_SHM_COLLECTIVES="0", PYCCL_ALGO="ring",
                       PYCCL_CHUNK_BYTES=str(CHUNK))
        cmd = [sys.executable, "-m", "pyccl.launch", "-n", "2", "-m", "pyccl.tune", "--worker",
               "--out", out, "--iters", str(iters)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"probe over {transport} failed (rc {r.returncode}): {r.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f)


def calibrate(iters=30, repeat=3, transports=PROBE_TRANSPORTS) -> dict:
    """{transport: {alpha_us, bw_gbs, reduce_gbs}, "_runs": raw runs}: medians over `repeat`."""
    out, runs = {}, {}
    for name in transports:
        fits = []
        for _ in range(repeat):
            g = reduce_gbs()
            p = probe(name, iters)
            fits.append((fit_engine if name == ENGINE else fit)(p["t_small"], p["t_large"], g))
            runs.setdefault(name, []).append(dict(p, reduce_gbs=g))
        out[name] = {k: float(np.median([f[k] for f in fits])) for k in FIELDS}
        out[name]["spread"] = {k: [min(f[k] for f in fits), max(f[k] for f in fits)] for k in FIELDS}
    return out, runs


def show(env=None) -> str:
    from pyccl.topology.cost import DEFAULTS, transport_costs
    prof = load(env)
    costs = transport_costs(env, measured_costs(prof))
    lines = [f"profile: {profile_path(env) or 'off'} ({'loaded' if prof else 'none: defaults'})"]
    for name, c in costs.items():
        src = "measured" if name in prof else "default"
        if c != (measured_costs(prof).get(name) or DEFAULTS.get(name)):
            src += " + PYCCL_* override"
        lines.append(f"  {name:9s} alpha {c.alpha * 1e6:8.2f} us  bw {1 / c.beta / 1e9:8.3f} GB/s  "
                     f"reduce {1 / c.gamma / 1e9:7.3f} GB/s  ({src})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyccl.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--show", action="store_true", help="print the costs the tuner uses now and exit")
    p.add_argument("--iters", type=int, default=30, help="timed calls per size (median)")
    p.add_argument("--repeat", type=int, default=3, help="probe runs per transport (median; min-max kept)")
    p.add_argument("--transports", default=",".join(PROBE_TRANSPORTS))
    p.add_argument("--out", help="profile path (default: PYCCL_TUNE_PROFILE or ~/.cache/pyccl/tune-<host>.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    if args.show:
        print(show())
        return 0
    path = args.out or profile_path()
    if not path:
        print("PYCCL_TUNE_PROFILE=off: nowhere to write; pass --out", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    found, runs = calibrate(args.iters, args.repeat, [t for t in args.transports.split(",") if t])
    save(found, path, {"runs": runs})
    for name, v in found.items():
        s = v["spread"]
        print(f"{name:4s} alpha {v['alpha_us']:7.2f} us ({s['alpha_us'][0]:.2f}-{s['alpha_us'][1]:.2f})  "
              f"bw {v['bw_gbs']:7.3f} GB/s ({s['bw_gbs'][0]:.3f}-{s['bw_gbs'][1]:.3f})  "
              f"reduce {v['reduce_gbs']:6.2f} GB/s ({s['reduce_gbs'][0]:.2f}-{s['reduce_gbs'][1]:.2f})")
    print(f"wrote {path} in {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
