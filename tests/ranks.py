"""Real multi-process test harness: N spawned processes, each with a real Communicator.

A `RankGroup` starts its ranks once and keeps them, so many tests can share the cost of
spawning Python and connecting sockets. `group.run(fn, *args)` runs the module-level
function `fn(comm, *args)` on every rank and returns the per-rank results; a failure on
any rank raises with every rank's traceback. A group that failed is restarted by
`ranks_fixture` before the next test, so one bad test does not poison the rest.
"""
import multiprocessing as mp
import os
import secrets
import traceback

from pyccl.store import StoreServer, TCPStore

_CTX = mp.get_context("spawn")


def _rank_main(rank, size, addr, secret, conn, env, comm_kwargs):
    os.environ.update(env)
    try:
        import pyccl
        store = TCPStore(addr[0], addr[1], secret, timeout=60)
        comm = pyccl.Communicator(rank, size, store=store, secret=secret, **comm_kwargs)
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
            conn.send(("ok", fn(comm, *args)))
        except BaseException:  # reported to the parent, which fails the test
            conn.send(("err", traceback.format_exc()))
    comm.close()
    conn.send(("closed", None))


class RankFailure(AssertionError):
    pass


class RankGroup:
    def __init__(self, size, env=None, timeout=120, **comm_kwargs):
        self.size = size
        self.timeout = timeout
        secret = secrets.token_bytes(32)
        self.server = StoreServer("127.0.0.1", 0, secret)
        env = {"PYCCL_TIMEOUT": "60", **(env or {})}
        self.pipes, self.procs = [], []
        for r in range(size):
            parent, child = _CTX.Pipe()
            p = _CTX.Process(target=_rank_main, args=(r, size, self.server.address, secret, child, env, comm_kwargs),
                             daemon=True)
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)
        self._collect("start")
        self.broken = False

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
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        self.server.close()
