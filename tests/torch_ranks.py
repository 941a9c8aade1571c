"""Persistent torch.distributed ranks for the "pyccl" backend tests.

`TorchRanks(size, init)` spawns `size` processes once. Each calls
``dist.init_process_group("pyccl", init_method=…)`` (init: "tcp", "file" or "env"), then makes a
Gloo group over the same processes (``dist.new_group(backend="gloo")``), and serves calls:
``ranks.run(fn, *args)`` runs the module-level ``fn(ctx, *args)`` on every rank, where
``ctx.pyccl`` is the default (pyccl) group, ``ctx.gloo`` the Gloo group, ``ctx.rank``/``ctx.size``.
A failure on any rank raises with every rank's traceback and marks the ranks broken (the test
module restarts them for the next test).
"""
import multiprocessing as mp
import os
import socket
import tempfile
import traceback
from datetime import timedelta

_CTX = mp.get_context("spawn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ctx:
    def __init__(self, rank, size, pyccl, gloo):
        self.rank, self.size, self.pyccl, self.gloo = rank, size, pyccl, gloo


def _rank_main(rank, size, init, where, conn, env, timeout_s):
    os.environ.update(env)
    try:
        import torch
        import torch.distributed as dist
        import pyccl.torch_backend  # noqa: F401 - registers "pyccl"
        torch.set_num_threads(1)
        kwargs = dict(rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
        if init == "tcp":
            kwargs["init_method"] = f"tcp://127.0.0.1:{where}"
        elif init == "file":
            kwargs["init_method"] = f"file://{where}"
        else:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(where))
            kwargs["init_method"] = "env://"
        dist.init_process_group("pyccl", **kwargs)
        gloo = dist.new_group(backend="gloo")
        ctx = Ctx(rank, size, dist.group.WORLD, gloo)
        conn.send(("ready", None))
    except BaseException:  # reported to the parent, which fails the test
        conn.send(("err", traceback.format_exc()))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args = msg
        try:
            conn.send(("ok", fn(ctx, *args)))
        except BaseException:  # reported to the parent, which fails the test
            conn.send(("err", traceback.format_exc()))
    try:
        dist.destroy_process_group()
    finally:
        conn.send(("closed", None))


class RankFailure(AssertionError):
    pass


class TorchRanks:
    def __init__(self, size, init="tcp", timeout=120, group_timeout=60, env=None):
        self.size, self.timeout, self.init = size, timeout, init
        self._tmp = None
        if init == "file":
            fd, self._tmp = tempfile.mkstemp(prefix="pyccl-torch-init-")
            os.close(fd)
            os.unlink(self._tmp)
            where = self._tmp
        else:
            where = free_port()
        env = {"PYCCL_TIMEOUT": str(group_timeout), "OMP_NUM_THREADS": "1", **(env or {})}
        self.pipes, self.procs = [], []
        for r in range(size):
            parent, child = _CTX.Pipe()
            p = _CTX.Process(target=_rank_main, args=(r, size, init, where, child, env, group_timeout), daemon=True)
            p.start()
            child.close()                 # so a rank that dies shows as EOF at once
            self.pipes.append(parent)
            self.procs.append(p)
        self.broken = False
        self._collect("start")

    def _collect(self, what, timeout=None):
        results, errors = [], []
        for r, pipe in enumerate(self.pipes):
            if not pipe.poll(timeout or self.timeout):
                errors.append(f"rank {r}: no answer within {timeout or self.timeout}s ({what})")
                results.append(None)
                continue
            try:
                kind, value = pipe.recv()
            except EOFError:
                errors.append(f"rank {r}: process died (exit code {self.procs[r].exitcode})")
                results.append(None)
                continue
            if kind == "err":
                errors.append(f"rank {r}:\n{value}")
            results.append(value)
        if errors:
            self.broken = True
            raise RankFailure(f"{what} failed on {len(errors)} rank(s):\n" + "\n".join(errors))
        return results

    def run(self, fn, *args, timeout=None):
        for pipe in self.pipes:
            pipe.send((fn, args))
        return self._collect(getattr(fn, "__name__", str(fn)), timeout)

    def close(self):
        for pipe, p in zip(self.pipes, self.procs):
            try:
                if p.is_alive():
                    pipe.send(None)
            except (BrokenPipeError, OSError):
                pass
        for pipe in self.pipes:
            try:
                if pipe.poll(15):
                    pipe.recv()
            except (EOFError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        if self._tmp and os.path.exists(self._tmp):
            os.unlink(self._tmp)
