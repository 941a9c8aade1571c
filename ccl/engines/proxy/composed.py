"""Several ranks per host, on the stream: the composition of ccl/engines/cuda_composed.py (node-
local CUDA IPC phases around a network phase on each rank's rail) with the rail phase proxied.

The staged composition moves the rail's bytes from the host: its call blocks the host for the
whole transfer and cannot be captured. Here every phase is queued on the device by the caller's
thread: the local phases are the one-host CUDA engine's kernels on its stream, the rail phase
is a proxy program (ccl/engines/proxy/program.py) launched on that same stream, its plan the
rail's (the ranks with my local index, one per host) walked by the proxy over the
communicator's executor. The caller's stream waits for the last phase; the host job that runs
the rail's network phase is queued like any proxied call's. So a call returns at once, CUDA
graphs capture it (local kernels, proxy launches and stream waits are all graph nodes) and each
replay moves the new contents.

What differs from the staged composition: no host wait between a local phase and the rail, so
a local phase that fails (a dead local peer, a mismatched call) does not stop this rank from
sending on its rail; its error stays in the local engine and raises at the next call on every
rank of the host (as NCCL: results of a failed call are undefined). The rails' peers learn of a
dead rank from the executor (PeerFailure) or the local kernels' timeout.
"""
from types import SimpleNamespace

from ...dtypes import AVG, DTYPES
from ..cuda_composed import CudaComposed
from ..staged_schedule import _Call


class ProxyComposed(CudaComposed):
    """The composed collectives on CUDA buffers of one communicator, with proxied rails
    (one per ProxyState, whose Resources it uses; `hier` the communicator's CPU Hierarchy)."""
    host_group = "proxyhost"         # the local engine's store prefix (the staged one is "cudahost")

    def __init__(self, pst, hier, chunk_cap):
        super().__init__(SimpleNamespace(comm=pst.res, hier=hier, dev=pst.dev))
        self.pst, self.res, self.chunk_cap = pst, pst.res, chunk_cap
        self._tags, self._capturing = [], False

    def call(self, name, what, caller, args, capturing):
        """Queue one composed collective on the device after `caller`'s work: (the proxy tags of
        its rail phases (none when captured: replays are the watcher's), the end event on the
        local engine's stream)."""
        self.local.raise_if_failed(what)
        self._tags, self._capturing = [], capturing
        end = self.run(name, what, caller, args)
        return self._tags, end

    def _rail(self, what, after, op_name, part, op=None, root=0, inp=None):
        """The rail phase as a proxy launch on stream `after`, which its end stays on."""
        i = inp.array if inp is not None else None
        key, build = rail_program(self.hier.rail, op_name, part.array, part.dtype, op, root, i,
                                  self.res.fixed_chunk, self.chunk_cap)
        pst = self.pst
        prog = pst.program(key, build, self._capturing, what)
        tag, _ = pst.launch(prog, after, 0 if i is None else i.ptr, part.array.ptr, self._capturing, False)
        if tag:
            self._tags.append(tag)
        return after

    def _local_done(self, what, n, end):
        """Nothing: the rail's launch follows the local phase on the stream (see the module doc)."""

    def _rail_idle(self, what):
        self.pst.synchronize(what)


def rail_program(rail, op_name, out, dtype, op=None, root=0, inp=None, fixed_chunk=None, chunk_cap=4 << 20):
    """(program key, build) of a rail phase for ProxyState.program: `rail` the Hierarchy's
    PlanEngine of my rail, `out` (and `inp` for all_gather and reduce_scatter; else in place)
    views with size/itemsize/nbytes, `dtype` the pyccl dtype name, `root` the root's host.
    build() returns (the staged description, name, chunk bytes, numpy dtype), as the flat
    programs' (tests/test_proxy_program.py runs these over TCP without a GPU)."""
    reducing = op_name in ("all_reduce", "reduce_scatter")
    if inp is None:
        plan, chunk = rail._tuned(op_name, out.size, out.itemsize, out.nbytes, root)
        views, fetch = {"out": out}, ("out",)
    else:               # counts as the builders take them: all_gather the input's, reduce_scatter the output's
        plan, chunk = rail._tuned(op_name, inp.size if op_name == "all_gather" else out.size, out.itemsize,
                                  max(out.nbytes, inp.nbytes))
        views, fetch = {"in": inp, "out": out}, ("in",)
    red = op if reducing else None
    key = ("rail", op_name, dtype, out.size, -1 if inp is None else inp.size, root, None if red is None else red.name)

    def build():
        staged = _Call(plan, chunk, views, fetch, ("out",), red, reducing and op is AVG, inp is None)
        return staged, op_name, chunk if fixed_chunk is not None else min(chunk, chunk_cap), DTYPES[dtype]
    return key, build
