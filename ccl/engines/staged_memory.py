"""memory / suspend / resume of the staged engine's Staging (ccl/engines/staged.py): its pinned
host arena and, with several ranks per host, the composed engine's device stage and local CUDA
collectives (ccl/engines/cuda_composed.py). The interface is the CUDA state's (see
ccl/engines/cuda/memory.py). Nothing here is named by a CUDA graph (the staged engine refuses
capture), so suspend() simply frees: the arena and the stage are made again by the next call
that needs them, and the local CUDA collectives suspend as the one-host engine's (graphs=False
passed on); resume() re-makes their scratch (collective). The proxy engine's composition
(ccl/engines/proxy/composed.py) shares composed_memory and composed_suspend, but keeps its stage,
which a captured graph may name, unless graphs=False."""


def composed_memory(c) -> dict:
    """The bytes a composition (CudaComposed) holds: its device stage and its local collectives'."""
    out = {"device.composed_stage": c._scratch_cap if c._scratch else 0}
    for k, v in c.local.memory().items():
        where, purpose = k.split(".", 1)
        out[f"{where}.local_{purpose}"] = v
    return out


def composed_suspend(c, graphs, free_stage):
    """Suspend a composition's local collectives (waiting for their phases; graphs as the one-host
    engine's suspend) and, with `free_stage`, free its device stage."""
    c.local.suspend(graphs)
    if free_stage and c._scratch:
        with c.local._device:
            c.local.rt.free(c._scratch)
        c._scratch, c._scratch_cap = 0, 0


class StagingMemoryMixin:
    """memory(), suspend(), resume() of Staging."""

    def memory(self) -> dict:
        out = {"pinned.staging_arena": self._arena_cap if self._arena_ptr else 0}
        if self.composed is not None:
            out.update(composed_memory(self.composed))
        return out

    def suspend(self, graphs=True):
        if self._closed:
            return
        rt = self.rt
        with self._device_ctx(rt, self.dev):
            for s in (self.d2h, self.h2d):      # copies still queued read or write the arena
                ev = rt.eventCreateWithFlags(2)
                try:
                    rt.eventRecord(ev, s)
                    self.wait_event(ev, "suspend", "queued copies")
                finally:
                    rt.eventDestroy(ev)
        self._free_arena()
        if self.composed is not None:          # never captured: the stage goes
            composed_suspend(self.composed, graphs, True)

    def suspend_all(self):
        self.suspend(graphs=False)

    def resume(self):
        if self.composed is not None and not self._closed:
            self.composed.local.resume()

