"""Real multi-process test harness: N spawned processes, each with a real Communicator.

A `RankGroup` starts its ranks once and keeps them, so many tests can share the cost of
spawning Python and connecting sockets. `group.run(fn, *args)` runs the module-level
function `fn(comm, *args)` on every rank and returns the per-rank results; a failure on
any rank raises with every rank's traceback. A group that failed is restarted by
`ranks_fixture` before the next test, so one bad test does not poison the rest.
`Ranks` is the part shared with tests/torch_ranks.py: processes, pipes, serving calls.
"""
import multiprocessing as mp
import os
import secrets
import traceback

from pyccl.store import StoreServer, TCPStore

_CTX = mp.get_context("spawn")


class RankFailure(AssertionError):
    pass


def serve(conn, obj):
    """In a rank: answer ("ok", fn(obj, *args)) or ("err", traceback) until told to stop."""
    conn.send(("ready", None))
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args = msg
        try:
            conn.send(("ok", fn(obj, *args)))
        except BaseException:  # reported to the parent, which fails the test
            conn.send(("err", traceback.format_exc()))


def dump_stacks_when_asked():
    """PYCCL_TEST_STACKS=N (debugging a hang): this process prints every thread's stack every N s
    to stderr (with pytest -s they reach the log even when an outer timeout kills pytest)."""
    if os.environ.get("PYCCL_TEST_STACKS"):
        import faulthandler
        faulthandler.dump_traceback_later(float(os.environ["PYCCL_TEST_STACKS"]), repeat=True)


def _rank_main(rank, size, addr, secret, env, comm_kwargs, ranks_per_host, conn):
    os.environ.update(env)
    dump_stacks_when_asked()
    if ranks_per_host:                    # pose as several hosts: ranks_per_host ranks each
        os.environ["PYCCL_HOST_ID"] = f"host{rank // ranks_per_host}"
    try:
        import pyccl
        store = TCPStore(addr[0], addr[1], secret, timeout=60)
        comm = pyccl.Communicator(rank, size, store=store, secret=secret, **comm_kwargs)
    except BaseException:  # reported to the parent, which fails the test
        conn.send(("err", traceback.format_exc()))
        return
    serve(conn, comm)
    comm.close()
    conn.send(("closed", None))


class Ranks:
    """`size` spawned processes running `target(rank, *args, conn)`, which must `serve`."""

    def __init__(self, size, timeout, target, args):
        self.size, self.timeout = size, timeout
        self.pipes, self.procs = [], []
        for r in range(size):
            parent, child = _CTX.Pipe()
            p = _CTX.Process(target=target, args=(r, *args, child), daemon=True)
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

    def close(self, drain=0.0):
        """Tell every rank to stop (waiting up to `drain` s for its goodbye), then reap."""
        for pipe, p in zip(self.pipes, self.procs):
            try:
                if p.is_alive():
                    pipe.send(None)
            except (BrokenPipeError, OSError):
                pass
        for pipe in self.pipes if drain else []:
            try:
                if pipe.poll(drain):
                    pipe.recv()
            except (EOFError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


class RankGroup(Ranks):
    def __init__(self, size, env=None, timeout=120, ranks_per_host=None, **comm_kwargs):
        """ranks_per_host: each rank sets PYCCL_HOST_ID=host<rank // ranks_per_host> (ranks
        posing as several hosts)."""
        secret = secrets.token_bytes(32)
        self.server = StoreServer("127.0.0.1", 0, secret)
        env = {"PYCCL_TIMEOUT": "60", **(env or {})}
        try:
            super().__init__(size, timeout, _rank_main, (size, self.server.address, secret, env, comm_kwargs,
                                                         ranks_per_host))
        except BaseException:
            self.server.close()
            raise

    def close(self):
        super().close()
        self.server.close()
