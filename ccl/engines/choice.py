"""Which engine runs a call: the lowest price among the engines that can run it.

Every engine answers `cost(call)`: its predicted seconds from the alpha-beta model of
pyccl.topology.cost (the measured profile of `python -m pyccl.tune` where there is one), or
None when it cannot run the call (another memory kind, op, placement, or a reproducible
call it cannot make reproducible). The cheapest wins; ties go to the earlier engine of the
registry's order, which lists the specialised engines before the general ones (the shm C
collectives before a plan over the shm transport, the composed hierarchy before a flat plan
across hosts). As in UCC's score map, the answer depends only on (op, memory kind, size,
dtype, reduction, root, splits) and on data every rank shares (topology, costs, settings),
so every rank chooses alike, which they must; it is cached per (op, memory kind, size,
reproducible, even splits, splits on the device): what the engines' takes() and price() read,
and the last two small all_reduce calls' answers by the Call itself (the validator hands a
repeated small all_reduce the same Call again: ccl/validate.py; other calls would only push them
out, as a barrier between the calls of a timing loop did).

PYCCL_ENGINE=<name> forces an engine wherever it can run the call (elsewhere the priced
choice stands, with a warning once); PYCCL_ALGO forces the plan's algorithm inside the flat
and composed engines (ccl/tuner.py). PYCCL_DEBUG=INFO logs each new choice with every
engine's price.
"""
import functools
import logging

from .. import settings
from ..errors import InvalidArgument

log = logging.getLogger("pyccl")
SMALL = 64 << 10                            # all_reduce Calls of at most this size are remembered (two)


class Engines:
    """The engines of one communicator, in tie-break order."""

    def __init__(self, engines, forced=None):
        self.engines = list(engines)
        self.by_name = {e.name: e for e in self.engines}
        self.forced = (forced if forced is not None else settings.get("PYCCL_ENGINE") or "").strip().lower()
        if self.forced and self.forced not in self.by_name:
            raise InvalidArgument(f"PYCCL_ENGINE={self.forced!r} names no engine of this communicator; "
                                  f"engines: {', '.join(self.by_name)}")
        self._chosen = {}
        self._last = self._before = (None, None)    # (a small Call, its engine): the last two, held

    def choose(self, call):
        last = self._last
        if call is last[0]:
            return last[1]
        before = self._before
        if call is before[0]:               # the one before (two held, as the validator does)
            self._last, self._before = before, last
            return before[1]
        # what any engine's takes() and price() read (dtype, reduction and root change neither)
        key = (call.op, call.kind, call.nbytes, call.reproducible, call.even, call.dev_splits)
        engine = self._chosen.get(key)
        if engine is None:
            engine = self._chosen[key] = self.decide(call)
        if key[2] <= SMALL and key[0] == "all_reduce":    # the calls the validator hands out again
            self._last, self._before = (call, engine), last
        return engine

    def prices(self, call) -> list:
        """[(engine, seconds or None)] in registry order."""
        return [(e, e.cost(call)) for e in self.engines]

    def decide(self, call):
        priced = self.prices(call)
        able = [(t, i, e) for i, (e, t) in enumerate(priced) if t is not None]
        if not able:
            raise InvalidArgument(f"{call.op}: no engine of this communicator runs {call!r} "
                                  f"(engines: {', '.join(e.name for e in self.engines)}; "
                                  f"{_why_not(call, self.engines)})")
        t, _, engine = min(able, key=lambda a: (a[0], a[1]))
        reason = f"lowest predicted time {t * 1e6:.1f} us"
        if self.forced:
            forced = next((e for _, _, e in able if e.name == self.forced), None)
            if forced is None:
                _warn_once(f"PYCCL_ENGINE={self.forced} cannot run {call.op} on {call.kind} memory here; "
                           f"using {engine.name}")
            else:
                engine, reason = forced, f"PYCCL_ENGINE={self.forced}"
        if log.isEnabledFor(logging.INFO):
            log.info("engine: %r -> %s (%s; %s)", call, engine.name, reason,
                     ", ".join(f"{e.name} {'-' if p is None else f'{p * 1e6:.1f} us'}" for e, p in priced))
        return engine

    def forget(self):
        """Drop every cached choice and plan (after changing PYCCL_ALGO at run time, on every
        rank alike: bench/tuner_check.py)."""
        self._chosen.clear()
        self._last = self._before = (None, None)
        for e in self.engines:
            getattr(e, "forget", lambda: None)()

    def abort(self):
        for e in self.engines:
            e.abort()

    def close(self):
        for e in reversed(self.engines):
            e.close()


def _why_not(call, engines) -> str:
    if call.kind == "cuda" and call.op == "all_to_all" and call.dev_splits:
        return ("all_to_all with split sizes in CUDA tensors runs on the ranks of one host only; across "
                "hosts pass the splits as lists (or use a CPU copy)")
    if call.kind == "cuda" and call.op in ("send", "recv"):
        return "CUDA buffers take send/recv through the torch backend (ccl/torch_backend/)"
    kinds = sorted({k for e in engines for k in e.kinds})
    if call.kind not in kinds:
        return f"memory kind {call.kind} needs one of {kinds}"
    return f"none of them runs {call.op} on {call.kind} memory with this placement"


@functools.lru_cache(maxsize=None)
def _warn_once(msg):
    log.warning("%s", msg)


def pricing(topo, costs, chunk_bytes=None, algo_env=""):
    """The host-memory engines a communicator on `topo` would have, made for pricing only
    (no connections, no shared memory): what `python -m pyccl.plan` shows. Same order as
    Communicator._make_engines, so ties break alike."""
    from .base import Resources
    from .composed import Hierarchy
    from .flat import FlatEngine
    n = topo.nranks
    res = Resources(0, n, "plan", 0.0, None, [{"host": h} for h in topo.hosts], topo, costs,
                    None, None, None, chunk_bytes or (1 << 20), chunk_bytes, "auto", False)
    listed = [Hierarchy(res, algo_env), FlatEngine(res, algo_env)]
    try:
        from .shm import ShmPricing
        listed.insert(0, ShmPricing(res))
    except ImportError:                       # no C core: a communicator would have no shm engine either
        pass
    return Engines(listed, forced="")
