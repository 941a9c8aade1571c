"""VM a's handle on the two-VM set-up of two-vm.sh: run a command in VM b, or a pyccl job with
ranks in both VMs, and collect what every rank reported.

    res = across(["tests/rdma/two_vm_rank.py", "every"], per_vm=2, env={"PYCCL_TRANSPORT": "ibverbs"})
    res.rcs      # {rank: exit code}; ranks 0..per_vm-1 run in VM a, the rest in VM b
    res.results  # {rank: the JSON object it printed after "RESULT "}

VM a hosts the job's store on its own address (10.78.0.1), reachable from VM b over the link;
VM b's share of the ranks is a job file its agent (vm_agent.py) starts.
"""
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import vm_ranks  # noqa: E402

ACTIVE = os.environ.get("TWO_VM") == "1" and os.path.exists(os.path.join(os.environ.get("TWO_VM_WORK", "/nonexistent"), "b"))
WORK = os.environ.get("TWO_VM_WORK", "")
A_IP = os.environ.get("TWO_VM_A_IP", "10.78.0.1")
B_IP = os.environ.get("TWO_VM_B_IP", "10.78.0.2")
_count = [0]


def post(argv, env=None, timeout=300.0) -> str:
    """Start `argv` in VM b now; returns the job id for wait()."""
    _count[0] += 1
    jid = f"{os.getpid()}-{_count[0]}"
    path = os.path.join(WORK, "jobs", jid + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump({"argv": list(argv), "env": dict(env or {}), "timeout": timeout}, f)
    os.rename(path + ".tmp", path)
    return jid


def wait(jid: str, timeout: float) -> tuple:
    """(exit code, output) of a VM b job; (None, '') when it did not end within `timeout` s
    (then it is cancelled)."""
    base = os.path.join(WORK, "jobs", jid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(base + ".rc"):
            with open(base + ".rc") as f:
                rc = int(f.read().strip() or -1)
            with open(base + ".out", "rb") as f:
                return rc, f.read().decode(errors="replace")
        time.sleep(0.1)
    open(base + ".cancel", "w").close()
    return None, ""


def in_b(argv, env=None, timeout=300.0) -> tuple:
    """Run a command in VM b: (exit code or None on timeout, output)."""
    return wait(post(argv, env, timeout), timeout + 15)


@dataclass
class Job:
    rcs: dict = field(default_factory=dict)       # rank -> exit code (124: killed at the timeout)
    results: dict = field(default_factory=dict)   # rank -> object printed after "RESULT "
    text: dict = field(default_factory=dict)      # rank -> its output

    def failed(self) -> str:
        """'' when every rank exited 0 and reported, else what went wrong (for asserts)."""
        bad = {r: rc for r, rc in self.rcs.items() if rc != 0}
        missing = [r for r in self.rcs if r not in self.results]
        if not bad and not missing:
            return ""
        return f"exit codes {bad}, no RESULT from {missing}:\n" + "\n".join(
            f"--- rank {r} (rc {self.rcs[r]}):\n{self.text.get(r, '')[-2500:]}" for r in sorted(set(bad) | set(missing)))


def _parse(text: str) -> Job:
    job = Job()
    rank = None
    chunks = {}
    for line in text.splitlines():
        if line.startswith("== rank "):
            rank = int(line.split()[2])
            chunks[rank] = []
        elif line.startswith("EXIT "):
            _, r, rc = line.split()
            job.rcs[int(r)] = int(rc)
        elif rank is not None:
            chunks[rank].append(line)
    for r, lines in chunks.items():
        job.text[r] = "\n".join(lines)
        for line in lines:
            if line.startswith("RESULT "):
                job.results[r] = json.loads(line[7:])
    return job


def across(argv, per_vm: int, env=None, timeout: float = 240.0) -> Job:
    """Run `python argv...` as a pyccl job of 2 * per_vm ranks: 0..per_vm-1 in VM a (here),
    per_vm..2*per_vm-1 in VM b; the store lives in this process on A_IP."""
    from pyccl.store import StoreServer
    secret = secrets.token_bytes(32)
    server = StoreServer(A_IP, 0, secret)
    store = f"{A_IP}:{server.address[1]}"
    size = 2 * per_vm
    env = {k: str(v) for k, v in (env or {}).items()}
    try:
        jid = post([sys.executable, os.path.join(HERE, "vm_ranks.py"), "--first", str(per_vm), "--count", str(per_vm),
                    "--size", str(size), "--store", store, "--secret", secret.hex(), "--timeout", str(timeout),
                    "--"] + list(argv), env, timeout + 30)
        local = vm_ranks.start(0, per_vm, size, store, secret.hex(), argv, dict(os.environ, **env))
        mine = vm_ranks.finish(local, timeout)
        rc_b, out_b = wait(jid, timeout + 60)
    finally:
        server.close()
    job = _parse(out_b)
    for r, (rc, text) in mine.items():
        job.rcs[r], job.text[r] = rc, text
        for line in text.splitlines():
            if line.startswith("RESULT "):
                job.results[r] = json.loads(line[7:])
    for r in range(per_vm, size):
        if r not in job.rcs:
            job.rcs[r] = -1 if rc_b is None else rc_b
            job.text.setdefault(r, f"(VM b job: rc {rc_b})\n{out_b[-3000:]}")
    return job
