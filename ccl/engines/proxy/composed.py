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
    (one per ProxyState; `res` the communicator's Resources, `hier` its CPU Hierarchy)."""
    host_group = "proxyhost"         # the local engine's store prefix (the staged one is "cudahost")

    def __init__(self, pst, res, hier, chunk_cap):
        super().__init__(SimpleNamespace(comm=res, hier=hier, dev=pst.dev))
        self.pst, self.res, self.chunk_cap = pst, res, chunk_cap
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
        rail, v = self.hier.rail, part.array
        reducing = op_name in ("all_reduce", "reduce_scatter")
        i = inp.array if inp is not None else None
        if i is None:
            plan, chunk = rail._tuned(op_name, v.size, v.itemsize, v.nbytes, root)
            views, fetch = {"out": v}, ("out",)
        else:               # counts as the builders take them: all_gather the input's, reduce_scatter the output's
            plan, chunk = rail._tuned(op_name, i.size if op_name == "all_gather" else v.size, v.itemsize,
                                      max(v.nbytes, i.nbytes))
            views, fetch = {"in": i, "out": v}, ("in",)
        red = op if reducing else None
        key = ("rail", op_name, part.dtype, v.size, -1 if i is None else i.size, root,
               None if red is None else red.name)
        pst = self.pst

        def build():
            staged = _Call(plan, chunk, views, fetch, ("out",), red, reducing and op is AVG, i is None)
            c = chunk if self.res.fixed_chunk is not None else min(chunk, self.chunk_cap)
            return staged, op_name, c, DTYPES[part.dtype]
        prog = pst.programs.get(key) or pst.program(key, build, self._capturing, what)
        tag, _ = pst.launch(prog, after, 0 if i is None else i.ptr, v.ptr, self._capturing, False)
        if tag:
            self._tags.append(tag)
        return after

    def _local_done(self, what, n, end):
        """Nothing: the rail's launch follows the local phase on the stream (see the module doc)."""

    def _rail_idle(self, what):
        self.pst.synchronize(what)
