"""Scenarios in fresh spawned processes (each its own CUDA context), results back through a queue.

A scenario is a module-level function `scenario(rank, size, port) -> picklable` of a test module;
`port` is a free TCP port for rank 0's store. run_spawned returns {rank: ("ok", result) or
("err", traceback text)}; a rank that dies without reporting is simply missing, and every
process is killed by the deadline, so a hang costs `timeout` seconds at most.
"""
import importlib
import multiprocessing as mp
import os
import socket
import time

from ranks import dump_stacks_when_asked


def _child(module, scenario, rank, size, port, env, q):
    os.environ.update(env)
    dump_stacks_when_asked()
    try:
        q.put((rank, "ok", getattr(importlib.import_module(module), scenario)(rank, size, port)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent test
        import traceback
        q.put((rank, "err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_spawned(module, scenario, size, envs, timeout):
    """Run module.scenario on `size` spawned ranks; envs[r] is added to rank r's environment."""
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(module, scenario, r, size, port, envs[r], q), daemon=True)
             for r in range(size)]
    for p in procs:
        p.start()
    out = {}
    deadline = time.monotonic() + timeout
    while len(out) < size and time.monotonic() < deadline:
        try:
            r, kind, val = q.get(timeout=1)
            out[r] = (kind, val)
        except Exception:  # noqa: BLE001 - queue.Empty: keep waiting
            if all(not p.is_alive() for p in procs) and q.empty():
                break
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    return out


def assert_every_check_passed(out, size):
    """Every rank of a spawned scenario returned ("ok", {check: True, ...}); names the rest."""
    for r in range(size):
        assert r in out, out
        kind, val = out[r]
        assert kind == "ok", val
        bad = {k: v for k, v in val.items() if v is not True}
        assert not bad, bad
