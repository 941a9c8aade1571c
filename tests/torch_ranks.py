"""Persistent torch.distributed ranks for the "pyccl" backend tests.

`TorchRanks(size, init)` spawns `size` processes once. Each calls
``dist.init_process_group("pyccl", init_method=…)`` (init: "tcp", "file" or "env"), then makes a
Gloo group over the same processes (``dist.new_group(backend="gloo")``), and serves calls:
``ranks.run(fn, *args)`` runs the module-level ``fn(ctx, *args)`` on every rank, where
``ctx.pyccl`` is the default (pyccl) group, ``ctx.gloo`` the Gloo group, ``ctx.rank``/``ctx.size``.
A failure on any rank raises with every rank's traceback and marks the ranks broken (the test
module restarts them for the next test).
"""
import os
import socket
import tempfile
import traceback
from datetime import timedelta

from ranks import RankFailure, Ranks, serve  # noqa: F401 - RankFailure for the tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ctx:
    def __init__(self, rank, size, pyccl, gloo):
        self.rank, self.size, self.pyccl, self.gloo = rank, size, pyccl, gloo


def _rank_main(rank, size, init, where, env, timeout_s, conn):
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
    except BaseException:  # reported to the parent, which fails the test
        conn.send(("err", traceback.format_exc()))
        return
    serve(conn, ctx)
    try:
        dist.destroy_process_group()
    finally:
        conn.send(("closed", None))


class TorchRanks(Ranks):
    def __init__(self, size, init="tcp", timeout=120, group_timeout=60, env=None):
        self.init = init
        self._tmp = None
        if init == "file":
            fd, self._tmp = tempfile.mkstemp(prefix="pyccl-torch-init-")
            os.close(fd)
            os.unlink(self._tmp)
            where = self._tmp
        else:
            where = free_port()
        env = {"PYCCL_TIMEOUT": str(group_timeout), "OMP_NUM_THREADS": "1", **(env or {})}
        super().__init__(size, timeout, _rank_main, (size, init, where, env, group_timeout))

    def close(self):
        super().close(drain=15)
        if self._tmp and os.path.exists(self._tmp):
            os.unlink(self._tmp)
