// pyccl's proxy kernel (ccl/engines/proxy/): collectives on CUDA buffers across hosts. The
// kernel copies between the user's device buffers and a pinned, device-mapped host arena; a
// host thread (the proxy) runs the network phase on that arena. They talk through words of
// pinned, device-mapped host memory ("blk", 64-bit words, layout below):
//
//   blk[0]  abort     host -> device: stop (the communicator failed or closed)
//   blk[1]  error     kernel -> host: 1 timed out, 2 aborted (the first error only)
//   blk[2]  err_call  the call number that failed, blk[3] err_where: the pass or item
//   blk[4]  posted    kernel -> host: the number of the last call that rang the doorbell
//   blk[5]  finished  host -> kernel: the number of the last call whose network phase is over
//   blk[6..8]         host only: handled, beat, fired (ccl/engines/proxy/watchdog.py)
//   blk[RING ...]     the doorbell ring: [program id, eager tag, site, 0] per call (tag 0: a replay)
//   blk[FILLED + i]   kernel -> host: out-item i of call n is in the arena (value n)
//   blk[DONE + c]     host -> kernel: pass c of call n has finalised its ranges (value n)
//   blk[SITE + s * GROUPS + g]  host -> stream: group g of the in-items of the call at site s
//                     may be copied back (1; the out launch of that site's next call resets it)
//
// Two ways to wait for the proxy (ccl/engines/proxy/state.py chooses):
// * MODE_STREAM_OUT then, per group of passes, a stream wait (cuStreamWaitValue64 on the SITE
//   word) and a MODE_STREAM_IN launch: no kernel is resident while the network runs, so on a
//   GPU shared by several processes (time-sliced) the others run meanwhile, and every wait is
//   a node a CUDA graph can hold. The stream waits without a timeout: the host releases every
//   SITE word when it gives up (abort), and a call at a site resets its words only while the
//   abort word is clear.
// * MODE_KERNEL: one launch does everything and spins on the words (bounded by timeout_ns and
//   the abort word), as NCCL's network transport does; for drivers without stream waits.
//
// Call numbers come from a counter in device memory (ctrl[0]), advanced by the last block of
// the (out) launch, so a launch captured in a CUDA graph gets a new number at every replay
// and the proxy learns of each replay from the doorbell.
typedef unsigned long long u64;

#define ABORT 0
#define ERROR 1
#define ERR_CALL 2
#define ERR_WHERE 3
#define POSTED 4
#define FINISHED 5
#define RING 16
#define RING_SLOTS 64
#define RING_WORDS 4
#define FILLED (RING + RING_WORDS * RING_SLOTS)
#define MAX_ITEMS 32768
#define DONE (FILLED + MAX_ITEMS)
#define MAX_PASSES 8192
#define SITE (DONE + MAX_PASSES)
#define SITES 4096
#define GROUPS 4
#define MODE_KERNEL 0
#define MODE_STREAM_OUT 1
#define MODE_STREAM_IN 2

struct Item {            // one copy: arena offset, device offset, bytes, (buffer << 32) | flag
  u64 host_off, dev_off, nbytes, buf_flag;
};

__device__ __forceinline__ u64 now_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ bool wait_ge(volatile u64* blk, int word, u64 n, u64 t0, u64 timeout_ns, int where) {
  int spins = 0;
  while (blk[word] < n) {
    if (blk[ERROR] != 0) return false;
    if (blk[ABORT] != 0 || now_ns() - t0 > timeout_ns) {
      if (atomicCAS((u64*)&blk[ERROR], 0ULL, blk[ABORT] != 0 ? 2ULL : 1ULL) == 0ULL) {
        blk[ERR_CALL] = n;
        blk[ERR_WHERE] = where;
        __threadfence_system();
      }
      return false;
    }
    if (++spins > 64) __nanosleep(200);
  }
  __threadfence_system();
  return true;
}

__device__ __forceinline__ void copy_bytes(char* dst, const char* src, u64 n) {
  u64 t = threadIdx.x, step = blockDim.x;
  if ((((u64)dst | (u64)src | n) & 15) == 0) {
    uint4* d = (uint4*)dst; const uint4* s = (const uint4*)src;
    for (u64 i = t; i < n / 16; i += step) d[i] = s[i];
  } else if ((((u64)dst | (u64)src | n) & 3) == 0) {
    unsigned* d = (unsigned*)dst; const unsigned* s = (const unsigned*)src;
    for (u64 i = t; i < n / 4; i += step) d[i] = s[i];
  } else {
    for (u64 i = t; i < n; i += step) dst[i] = src[i];
  }
}

extern "C" __global__ void proxy_call(const Item* items, int n_out, int n_in, u64 dev_in, u64 dev_out,
                                      u64 arena, u64 blk_ptr, u64 ctrl_ptr, u64 prog, u64 tag,
                                      u64 timeout_ns, int out_ctas, u64 site, int mode) {
  volatile u64* blk = (volatile u64*)blk_ptr;
  if (mode == MODE_STREAM_IN) {      // a group of in-items the stream has waited for
    if (blk[ABORT] != 0) return;
    for (int j = blockIdx.x; j < n_in; j += gridDim.x) {
      Item it = items[j];
      char* dst = (char*)((it.buf_flag >> 32) ? dev_out : dev_in) + it.dev_off;
      copy_bytes(dst, (const char*)arena + it.host_off, it.nbytes);
    }
    return;
  }
  u64* ctrl = (u64*)ctrl_ptr;
  __shared__ int stop;
  const u64 n = ((volatile u64*)ctrl)[0] + 1;
  const u64 t0 = now_ns();
  if (threadIdx.x == 0) {
    stop = 0;
    if (blockIdx.x == 0) {           // ring the doorbell: which program, eager or replay, site
      if (mode == MODE_STREAM_OUT && blk[ABORT] == 0) {
        for (int g = 0; g < GROUPS; g++) blk[SITE + site * GROUPS + g] = 0;
        __threadfence_system();
      }
      volatile u64* slot = blk + RING + RING_WORDS * ((n - 1) % RING_SLOTS);
      slot[0] = prog;
      slot[1] = tag;
      slot[2] = site;
      __threadfence_system();
      blk[POSTED] = n;
      __threadfence_system();
    }
  }
  __syncthreads();
  if ((int)blockIdx.x < out_ctas) {  // device -> arena, one flag per item
    for (int i = blockIdx.x; i < n_out; i += out_ctas) {
      Item it = items[i];
      const char* src = (const char*)((it.buf_flag >> 32) ? dev_out : dev_in) + it.dev_off;
      if (blk[ABORT] == 0) copy_bytes((char*)arena + it.host_off, src, it.nbytes);
      __threadfence_system();
      __syncthreads();
      if (threadIdx.x == 0) blk[FILLED + i] = n;
    }
  } else {                           // MODE_KERNEL: arena -> device, after the proxy finalised the pass
    int in_ctas = gridDim.x - out_ctas;
    for (int j = blockIdx.x - out_ctas; j < n_in; j += in_ctas) {
      Item it = items[n_out + j];
      int pass = (int)(it.buf_flag & 0xffffffffULL);
      if (threadIdx.x == 0 && !wait_ge(blk, DONE + pass, n, t0, timeout_ns, pass)) stop = 1;
      __syncthreads();
      if (stop) break;
      char* dst = (char*)((it.buf_flag >> 32) ? dev_out : dev_in) + it.dev_off;
      copy_bytes(dst, (const char*)arena + it.host_off, it.nbytes);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    u64 before = atomicAdd(&ctrl[1], 1ULL);
    if (before == gridDim.x - 1) {   // the last block: (wait for the network phase,) then advance
      if (mode == MODE_KERNEL) wait_ge(blk, FINISHED, n, t0, timeout_ns, -1);
      ctrl[1] = 0;
      __threadfence();
      ((volatile u64*)ctrl)[0] = n;
      __threadfence();
    }
  }
}
