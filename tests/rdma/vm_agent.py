"""VM b's side of two-vm.sh: run the commands VM a's tests post, until VM a says stop.

    python tests/rdma/vm_agent.py WORK

The two guests share the host directory WORK (9p, no cache: a file one writes, the other
sees).  A job is WORK/jobs/ID.json = {"argv": [...], "env": {...}, "timeout": s}, written
whole (renamed into place); the agent starts it at once (jobs run side by side: a test
starts ranks here and in VM a at the same time), and when it ends writes ID.out (stdout and
stderr) and then ID.rc.  WORK/jobs/ID.cancel kills a running job.  The agent ends when
WORK/stop appears, or after TWO_VM_AGENT_S seconds (default 1500) so a VM a that died does
not keep VM b up; running jobs are killed then.
"""
import json
import os
import signal
import subprocess
import sys
import time


def _write(path, data: bytes):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def main(work):
    jobs = os.path.join(work, "jobs")
    os.makedirs(jobs, exist_ok=True)
    local = "/tmp/vm-agent"
    os.makedirs(local, exist_ok=True)
    deadline = time.monotonic() + float(os.environ.get("TWO_VM_AGENT_S", "1500"))
    seen, running = set(), {}          # id -> (Popen, output path, deadline)
    print(f"vm-agent: waiting for jobs in {jobs}", flush=True)
    while not os.path.exists(os.path.join(work, "stop")) and time.monotonic() < deadline:
        for name in sorted(os.listdir(jobs)):
            jid, ext = os.path.splitext(name)
            if ext == ".json" and jid not in seen:
                seen.add(jid)
                try:
                    with open(os.path.join(jobs, name)) as f:
                        job = json.load(f)
                    out = os.path.join(local, jid + ".out")
                    with open(out, "wb") as fo:
                        p = subprocess.Popen(job["argv"], env=dict(os.environ, **job.get("env", {})), stdout=fo,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True)
                except (OSError, ValueError, KeyError) as e:
                    _write(os.path.join(jobs, jid + ".out"), f"vm-agent: cannot start job {jid}: {e}\n".encode())
                    _write(os.path.join(jobs, jid + ".rc"), b"127")
                    continue
                running[jid] = (p, out, time.monotonic() + float(job.get("timeout", 300)))
        for jid, (p, out, until) in list(running.items()):
            cancel = os.path.exists(os.path.join(jobs, jid + ".cancel"))
            if p.poll() is None and (cancel or time.monotonic() > until):
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            if p.poll() is not None:
                del running[jid]
                with open(out, "rb") as f:
                    _write(os.path.join(jobs, jid + ".out"), f.read())
                _write(os.path.join(jobs, jid + ".rc"), str(p.returncode).encode())
        time.sleep(0.1)
    for p, _, _ in running.values():
        os.killpg(p.pid, signal.SIGKILL)
    print(f"vm-agent: done ({len(seen)} jobs)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
