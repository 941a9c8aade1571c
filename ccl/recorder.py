"""Flight recorder: the last N collectives of a communicator, for hang diagnosis.

Each entry says what was called (op, dtype, count, root, sequence number), when it was
queued, started and ended, and where the executor was when it failed or timed out (plan
stage, chunk, peer). On a timeout, with PYCCL_DUMP_ON_TIMEOUT=<dir>, every rank that
times out writes its recorder as JSON to <dir>/pyccl-<comm>-rank<r>.json;
`python -m pyccl.doctor <dir or files>` reads them and says who is behind or stuck.
"""
import collections
import json
import os
import time

DEFAULT_ENTRIES = 64
_time = time.time


_SIG_KEYS = ("dtype", "count", "root", "redop")
# entry layout: a list, cheap to make on every call; snapshot() turns it into a dict
SEQ, OP, SIG, STATE, QUEUED, STARTED, ENDED, WHERE, ERROR = range(9)


class FlightRecorder:
    def __init__(self, tag: str, rank: int, size: int, entries: int = DEFAULT_ENTRIES):
        self.tag, self.rank, self.size = tag, rank, size
        self.entries = collections.deque(maxlen=entries)

    def record(self, seq: int, op: str, sig) -> list:
        """sig: a dict, or the tuple (dtype, count, root, redop)."""
        entry = [seq, op, sig, "queued", time.time(), None, None, "", None]
        self.entries.append(entry)
        return entry

    def ran(self, seq: int, op: str, sig, started: float) -> list:
        """A call that ran as it was made (the queue's run_now), recorded once it ended, as
        done: one entry made whole instead of made and then finished (~0.1 us of an 8-byte
        all_reduce). Nothing reads the recorder while such a call runs: a dump is written by
        the failing call's own thread, after finish(entry, error) marks it failed."""
        entry = [seq, op, sig, "done", started, started, _time(), "", None]
        self.entries.append(entry)
        return entry

    @staticmethod
    def start(entry):
        entry[STATE] = "running"
        entry[STARTED] = time.time()

    @staticmethod
    def finish(entry, error=None, where=""):
        entry[ENDED] = time.time()
        entry[STATE] = "done" if error is None else "failed"
        if error is not None:
            entry[ERROR] = f"{type(error).__name__}: {error}"
            entry[WHERE] = where

    @staticmethod
    def as_dict(entry) -> dict:
        sig = entry[SIG]
        d = {"seq": entry[SEQ], "op": entry[OP],
             **(sig if isinstance(sig, dict) else dict(zip(_SIG_KEYS, sig))),
             "state": entry[STATE], "queued": entry[QUEUED], "started": entry[STARTED],
             "ended": entry[ENDED], "where": entry[WHERE]}
        if entry[ERROR] is not None:
            d["error"] = entry[ERROR]
        return d

    def snapshot(self) -> dict:
        return {"comm": self.tag, "rank": self.rank, "size": self.size, "pid": os.getpid(),
                "host": os.uname().nodename, "dumped": time.time(),
                "entries": [self.as_dict(e) for e in self.entries]}

    def dump(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"pyccl-{self.tag}-rank{self.rank}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.snapshot(), f, indent=1)
        os.replace(tmp, path)
        return path
