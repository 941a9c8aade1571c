"""`python -m pyccl.launch -n N [options] (prog.py | -m module) args…`: N local ranks, no MPI needed.

The launcher hosts the rendezvous store (bound to --master-addr, 127.0.0.1 by default),
makes a fresh random job secret, and starts every rank as `python prog.py args…` (or
`python -m module args…`) with PYCCL_RANK, PYCCL_SIZE, PYCCL_LOCAL_RANK, PYCCL_LOCAL_SIZE,
PYCCL_STORE_ADDR and PYCCL_JOB_SECRET set, and torchrun's RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (a free port for the torch store that rank 0's
``init_process_group`` opens), so that ``dist.init_process_group("pyccl")`` works with no
arguments, as under torchrun. pyccl.env.detect() reads PYCCL_* first, so the two cannot be
mistaken for each other.

With --elastic, a rank that fails is started again (up to --max-restarts times in all, default
3) with the same variables plus PYCCL_JOIN=1: its `pyccl.init()` then joins the running job
(`pyccl.join()`) while the survivors, who saw the failure as a PeerFailure, call
`comm.shrink()` and then `comm.grow(1)` (ccl/elastic.py). The job fails as below once the
restarts are spent. A failure is *not* restarted (the job fails as without --elastic) when
another rank has already exited 0, or when no member of the job is running any more (none, or
only replacements not yet taken by a grow: the launcher reads the grows' count of joiners,
``pyccl/join/taken``, in its own store); and once only such waiting replacements are left, the
job is stopped as failed. A replacement joins only through the members' grow, so there it
would wait PYCCL_TIMEOUT for a grow that never comes (a rank that crashed at exit after its
work was done, on a GPU, and ranks that all fail at start-up cost whole timeouts so).
torchrun differs on purpose: it restarts the whole group from the start on any failure (its
workers re-rendezvous and re-run), whatever the others' state; a pyccl replacement joins a
running job, which only makes sense while the job runs.

--log-dir DIR (like torchrun's --log-dir with redirects): every process's stdout and stderr go
to DIR/rank<R>.<K>.log instead of the launcher's (K: 0 for the first process of rank R, 1, 2,
... for its replacements), and the launcher's own lines also to DIR/launch.log, each with the
seconds since the launch, so a crash of one rank (a faulthandler dump, a C++ abort message)
stays with that rank.

Ranks' stdout and stderr pass through unchanged. When a rank fails, the launcher names it
and its exit code on stderr, gives the others --grace seconds to finish, then SIGTERM, then
SIGKILL, and exits with the first failing rank's code (128+N for death by signal N).
SIGINT/SIGTERM sent to the launcher are forwarded to every rank, with the same escalation.

Everything after the script name (or after `-m module`, or after `--`) belongs to the program,
even options that look like the launcher's own.
"""
import argparse
import os
import secrets
import signal
import subprocess
import sys
import time

from .elastic import JOIN
from .store import StoreServer

_KILL_WAIT = 3.0        # seconds between SIGTERM and SIGKILL
_POLL = 0.05

# The launcher's own options, and whether each takes a value (used to find where the program starts).
_OPTS_WITH_VALUE = {"-n", "--nproc", "--nproc-per-node", "--master-addr", "--port", "--grace", "--max-restarts",
                    "--log-dir"}
_FLAGS = {"-h", "--help", "--elastic"}


def _parser():
    p = argparse.ArgumentParser(prog="python -m pyccl.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--nproc", "--nproc-per-node", dest="nproc", type=int, required=True,
                   help="number of ranks to start")
    p.add_argument("--master-addr", default="127.0.0.1",
                   help="address the store listens on (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=0, help="store port (default 0: any free port)")
    p.add_argument("--grace", type=float, default=5.0,
                   help="seconds the other ranks get to finish after one fails (default 5)")
    p.add_argument("--elastic", action="store_true",
                   help="restart a rank that fails; the replacement joins the running job (pyccl.join())")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="with --elastic: restarts allowed in all before the job fails (default 3)")
    p.add_argument("--log-dir", default=None,
                   help="write each process's stdout+stderr to DIR/rank<R>.<K>.log and the launcher's lines "
                        "also to DIR/launch.log")
    p.add_argument("-m", dest="module", help="run a library module as a script, like `python -m`")
    p.add_argument("program", nargs=argparse.REMAINDER, help="script and its arguments")
    return p


def _split(argv):
    """Split argv into (launcher options, module, program + args) by where the program starts.

    argparse alone cannot do it: with `-m mod --flag` it rejects `--flag`, and with
    `-m mod -n 2` it would take the program's `-n` as ours.
    """
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            return argv[:i], None, argv[i + 1:]
        if a == "-m":
            if i + 1 >= len(argv):
                return argv[:i + 1], None, []      # argparse reports the missing module
            return argv[:i], argv[i + 1], argv[i + 2:]
        if a.startswith("-m") and not a.startswith("--"):
            return argv[:i], a[2:], argv[i + 1:]
        if a in _OPTS_WITH_VALUE:
            i += 2
            continue
        if a in _FLAGS or (a.startswith("--") and "=" in a) or (a.startswith("-n") and a[2:].isdigit()):
            i += 1
            continue
        if a.startswith("-"):
            i += 1                                  # unknown option: argparse will complain
            continue
        return argv[:i], None, argv[i:]
    return argv, None, []


def main(argv=None) -> int:
    """Run the job; returns the exit code (0, the first failing rank's code, or 128+signal)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    head, module, program = _split(argv)
    args = parser.parse_args(head)
    if module is not None:
        args.module = module
    if args.nproc < 1:
        parser.error("-n must be at least 1")
    if not args.module and not program:
        parser.error("give a script (prog.py args…) or a module (-m module args…)")
    if args.grace < 0:
        parser.error("--grace must be >= 0")
    if args.max_restarts < 0:
        parser.error("--max-restarts must be >= 0")

    secret = secrets.token_bytes(32)
    try:
        server = StoreServer(args.master_addr, args.port, secret)
    except OSError as e:
        print(f"pyccl.launch: cannot start the store: {e}", file=sys.stderr)
        return 1
    host, port = server.address[0], server.address[1]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"   # children are local: reach it on loopback
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    cmd = [sys.executable] + (["-m", args.module] if args.module else []) + program
    torch_port = _free_port(host)

    state = {"signal": None}
    children = []
    starts = [0] * args.nproc               # processes started per rank (names the log files)
    say = _Say(args.log_dir)
    if args.log_dir:
        try:
            os.makedirs(args.log_dir, exist_ok=True)
        except OSError as e:
            print(f"pyccl.launch: cannot make --log-dir {args.log_dir}: {e}", file=sys.stderr)
            server.close()
            return 1

    def forward(signum, _frame):
        state["signal"] = state["signal"] or signum
        for c in children:
            if c.poll() is None:
                try:
                    c.send_signal(signum)
                except OSError:
                    pass

    def start(rank, joining=False):
        env = dict(os.environ)
        env.update(PYCCL_RANK=str(rank), PYCCL_SIZE=str(args.nproc), PYCCL_LOCAL_RANK=str(rank),
                   PYCCL_LOCAL_SIZE=str(args.nproc), PYCCL_STORE_ADDR=addr, PYCCL_JOB_SECRET=secret.hex(),
                   RANK=str(rank), WORLD_SIZE=str(args.nproc), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(args.nproc), MASTER_ADDR=host, MASTER_PORT=str(torch_port))
        if joining:
            env["PYCCL_JOIN"] = "1"
        out = None
        try:
            if args.log_dir:
                out = open(os.path.join(args.log_dir, f"rank{rank}.{starts[rank]}.log"), "ab")
            starts[rank] += 1
            return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
        except OSError as e:
            say(f"cannot start rank {rank} ({' '.join(cmd)}): {e}")
            return None
        finally:
            if out is not None:
                out.close()                 # the child has its own copy

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for rank in range(args.nproc):
            child = start(rank)
            if child is None:
                _stop(children, 0.0)
                return 1
            children.append(child)
        restart = (lambda rank: start(rank, joining=True)) if args.elastic else None
        def taken():
            try:
                return int(server.peek(f"{JOIN}/taken") or 0)
            except ValueError:
                return 0
        rc = _supervise(children, args.grace, state, restart, args.max_restarts, say, taken)
        say(f"exit code {rc}", quiet=True)
        return rc
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        server.close()
        say.close()


class _Say:
    """The launcher's lines: stderr, and with --log-dir also DIR/launch.log (seconds since start)."""

    def __init__(self, log_dir):
        self.t0 = time.monotonic()
        self.f = None
        if log_dir:
            try:
                os.makedirs(log_dir, exist_ok=True)
                self.f = open(os.path.join(log_dir, "launch.log"), "a")
            except OSError:
                self.f = None               # main() reports the folder itself

    def __call__(self, text, quiet=False):
        if not quiet:
            print(f"pyccl.launch: {text}", file=sys.stderr, flush=True)
        if self.f is not None:
            self.f.write(f"{time.monotonic() - self.t0:9.3f} {text}\n")
            self.f.flush()

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


def _free_port(host: str) -> int:
    """A port nobody listens on now, for torch's own store (torchrun --standalone does alike)."""
    import socket
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def _describe(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"killed by {name}, exit code {128 - rc}"
    return f"exit code {rc}"


def _stop(children, grace):
    """Let running children finish for `grace` s, then SIGTERM, then SIGKILL; reap them all."""
    deadline = time.monotonic() + grace
    while any(c.poll() is None for c in children) and time.monotonic() < deadline:
        time.sleep(_POLL)
    for how in ("terminate", "kill"):
        running = [c for c in children if c.poll() is None]
        for c in running:
            try:
                getattr(c, how)()
            except OSError:
                pass
        deadline = time.monotonic() + _KILL_WAIT
        while any(c.poll() is None for c in running) and time.monotonic() < deadline:
            time.sleep(_POLL)
    for c in children:
        c.wait()


def _supervise(children, grace, state, restart=None, max_restarts=0, say=None, taken=None) -> int:
    """Wait for the ranks; on the first failure (or a forwarded signal) stop the rest, unless
    `restart(rank)` may start a replacement (--elastic, up to `max_restarts` in all, while no
    rank has exited 0 and a member still runs: see the module doc). `taken()`: how many
    joiners the job's grows have taken so far (replacements still waiting are not members)."""
    say = say or (lambda text, quiet=False: print(f"pyccl.launch: {text}", file=sys.stderr, flush=True))
    taken = taken or (lambda: 0)
    failed = None
    restarts = 0
    done = None                             # the first rank that exited 0: the job is finishing
    waiting = []                            # ranks whose replacement no grow has taken yet, oldest first
    seen = taken()
    last = None                             # (rank, rc) of the latest failure that was restarted
    while True:
        now = taken()
        while now > seen and waiting:       # joiners are taken in arrival order, about start order
            say(f"rank {waiting.pop(0)}'s replacement joined", quiet=True)
            seen += 1
        seen = max(seen, now)
        rcs = [c.poll() for c in children]
        for rank, rc in enumerate(rcs):
            if rc is not None and rank in waiting:
                waiting.remove(rank)
            if rc == 0 and done is None:
                done = rank
                say(f"rank {rank} exited 0 (pid {children[rank].pid})", quiet=True)
        for rank, rc in enumerate(rcs):
            if rc in (None, 0) or failed is not None:
                continue
            c = children[rank]
            why = _no_restart(rank, rcs, done, waiting) if restart is not None else "no --elastic"
            if why is None and restarts < max_restarts and state["signal"] is None:
                restarts += 1
                say(f"rank {rank} failed ({_describe(rc)}, pid {c.pid}); starting a replacement that joins "
                    f"the job (restart {restarts} of {max_restarts})")
                new = restart(rank)
                if new is not None:
                    children[rank] = new
                    rcs[rank] = None
                    waiting.append(rank)
                    last = (rank, rc)
                    continue
            failed = (rank, rc)
            note = f"; not restarted: {why}" if restart is not None and why and why != "no --elastic" else ""
            say(f"rank {rank} failed ({_describe(rc)}){note}; stopping the other ranks (pid {c.pid})")
        running = [r for r, rc in enumerate(rcs) if rc is None]
        if failed is None and running and last is not None and all(r in waiting for r in running):
            failed = last
            say(f"rank(s) {running} wait to join, but no member of the job is running any more to grow it; "
                f"stopping them (the job fails with rank {last[0]}'s {_describe(last[1])})")
        if failed is not None or state["signal"] is not None:
            _stop(children, grace)
            break
        if all(c.poll() is not None for c in children):
            break
        time.sleep(_POLL)
    if failed is None:                      # a signal stopped us: report the first rank that did not exit 0
        for rank, c in enumerate(children):
            if c.returncode != 0:
                failed = (rank, c.returncode)
                break
    if failed is not None:
        return _code(failed[1])
    return 128 + state["signal"] if state["signal"] is not None else 0


def _no_restart(rank, rcs, done, waiting):
    """Why a failed `rank` gets no replacement (None: it may): a replacement joins only through
    the members' grow, which a finished job or one with no member left never calls."""
    if done is not None:
        return f"rank {done} already finished (exit code 0), so the job is ending and no grow would take a replacement"
    if not any(rc is None and r not in waiting for r, rc in enumerate(rcs) if r != rank):
        return "no member of the job is running (at most replacements waiting to join), so no grow would take one"
    return None


if __name__ == "__main__":
    sys.exit(main())
