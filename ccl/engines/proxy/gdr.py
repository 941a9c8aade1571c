"""GPUDirect RDMA: can the NIC read and write this GPU's memory, and which way.

With GPUDirect the proxy's arena copies would go for ibverbs: the kernel would only raise and
wait on flags, and the executor would post RDMA on the device buffers themselves, registered
through the same memory-region cache (transports/ibverbs) with a dmabuf fd instead of a host
address; the reductions then run on the GPU (a kernel per received chunk), since the CPU cannot
read device memory at speed. TCP always stages: sockets need host memory. That data path needs a
NIC that offers it, which no machine here has, so it is not built: ``choose`` decides, the proxy
logs the decision at PYCCL_DEBUG=INFO, and the arena path runs either way.

The two ways, preferred first:
* dmabuf: the GPU exports device memory as a dma-buf (CUDA driver attribute
  CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED) and rdma-core registers it (ibv_reg_dmabuf_mr, rdma-core
  34, Linux 5.12); no out-of-tree module.
* peermem: the nvidia_peermem kernel module lets ibv_reg_mr take device pointers directly.
"""
import ctypes
import os

_ATTR_DMA_BUF_SUPPORTED = 124           # CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED


def choose(transport: str, dmabuf_gpu: bool, dmabuf_verbs: bool, peermem: bool):
    """(way or None, why) for the network transport of a proxied call."""
    if transport != "ibverbs":
        return None, f"the network transport is {transport}: sockets need host memory"
    if dmabuf_gpu and dmabuf_verbs:
        return "dmabuf", "the GPU exports dma-bufs and rdma-core registers them (ibv_reg_dmabuf_mr)"
    if peermem:
        return "peermem", "the nvidia_peermem module is loaded (ibv_reg_mr takes device pointers)"
    why = []
    if not dmabuf_gpu:
        why.append("the GPU or driver offers no dma-buf export")
    elif not dmabuf_verbs:
        why.append("this rdma-core has no ibv_reg_dmabuf_mr")
    why.append("nvidia_peermem is not loaded")
    return None, "; ".join(why)


def probe(device: int) -> dict:
    """The facts ``choose`` takes, read from this machine (False where they cannot be read)."""
    facts = {"dmabuf_gpu": False, "dmabuf_verbs": False, "peermem": os.path.isdir("/sys/module/nvidia_peermem")}
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        val = ctypes.c_int(0)
        if lib.cuDeviceGetAttribute(ctypes.byref(val), _ATTR_DMA_BUF_SUPPORTED, int(device)) == 0:
            facts["dmabuf_gpu"] = bool(val.value)
    except OSError:
        pass
    try:
        facts["dmabuf_verbs"] = hasattr(ctypes.CDLL("libibverbs.so.1"), "ibv_reg_dmabuf_mr")
    except OSError:
        pass
    return facts
