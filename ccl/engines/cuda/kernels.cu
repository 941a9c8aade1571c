// pyccl GPU kernels (built ahead by setup.py, or by NVRTC on a background thread and cached on
// disk: see ccl/engines/cuda/build.py). No CUDA header is included: NVRTC compiles this without
// any include path, and cuda_fp16.h / cuda_bf16.h alone cost most of a compile.
//
// Every rank's "flag buffer" (IPC-mapped into its peers) holds, in 64-bit words:
//   [OFF_ONESHOT] [2 slots][MAXB blocks][MAXR ranks][epoch, sig]   one-shot all-reduce
//   [OFF_FA]      [MAXB][MAXR][epoch, sig]                         two-shot, after the push
//   [OFF_FE]      [MAXB][MAXR][epoch, sig]                         two-shot, at the end
//   [OFF_BAR]     [MAXR][epoch, sig]                               stream barrier
//   [OFF_FS]      [MAXB][MAXR][epoch, sig]                         pull two-shot, at the start
//   [OFF_SPL]     [2 slots][MAXR ranks][SPL_ROW]                   all-to-all with device splits:
//                 each rank's row (what it sends to every rank, its input and output capacity,
//                 what it expects from every rank and whether it said so)
//   [OFF_RP]      [MAXB][MAXR][value, sig]                         scratch all-to-all, round pushed
//   [OFF_RC]      [MAXB][MAXR][value, sig]                         scratch all-to-all, round drained
// A rank *writes* its flags into the peer's buffer (sig first, then the epoch with a
// release store) and *polls* its own (acquire loads), so a dead peer only ever means a
// flag that does not move. Epochs grow by one per use on every rank alike (kept on the device,
// see epoch_begin); a wait is over
// when the flag reaches the epoch. The sig (op, dtype, count, root) must match, else the
// call was mismatched. Every wait is bounded: after timeout_ns, or when the host sets
// status[0] (abort), the kernel writes the reason into status (host-mapped memory) and
// returns without touching user data.
//
// tab (device memory, written by the host): tab[0*MAXR + r] = rank r's flag buffer,
// tab[1*MAXR + r] = rank r's one-shot scratch, tab[2*MAXR + r] = rank r's two-shot scratch,
// each as mapped in this process (r == rank: our own).
// 16-bit floats as bits; conversions by PTX cvt (round to nearest even, as __float2half_rn and
// __float2bfloat16_rn do; a NaN stays a NaN).
struct __align__(2) f16_t { unsigned short x; };
struct __align__(2) bf16_t { unsigned short x; };
__device__ __forceinline__ float f16_to_float(f16_t h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.x));
  return f;
}
__device__ __forceinline__ f16_t float_to_f16(float f) {
  f16_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.x) : "f"(f));
  return h;
}
__device__ __forceinline__ float bf16_to_float(bf16_t b) { return __uint_as_float(((unsigned)b.x) << 16); }
__device__ __forceinline__ bf16_t float_to_bf16(float f) {
  bf16_t b;
#if __CUDA_ARCH__ >= 800
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b.x) : "f"(f));
#else
  unsigned u = __float_as_uint(f);
  b.x = (u & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((u >> 16) | 0x40u)
                                        : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
  return b;
}

typedef unsigned long long u64;
typedef long long i64;

#define MAXR 8
#define MAXB 256
#define OFF_ONESHOT 0
#define OFF_FA (2 * MAXB * MAXR * 2)
#define OFF_FE (OFF_FA + MAXB * MAXR * 2)
#define OFF_BAR (OFF_FE + MAXB * MAXR * 2)
#define OFF_FS (OFF_BAR + MAXR * 2 + 16)
#define OFF_SPL (OFF_FS + MAXB * MAXR * 2)
#define SPL_ROW (2 * MAXR + 3)
#define OFF_RP (OFF_SPL + 2 * MAXR * SPL_ROW)
#define OFF_RC (OFF_RP + MAXB * MAXR * 2)

__device__ __forceinline__ u64 gtime() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void st_release(u64* p, u64 v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void st_relaxed(u64* p, u64 v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ u64 ld_acquire(const u64* p) {
  u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ u64 ld_relaxed(const u64* p) {
  u64 v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ void report(i64* status, int code, u64 epoch, int peer, int where) {
  volatile i64* s = status;
  if (s[1] != 0) return;
  s[2] = (i64)epoch;
  s[3] = peer;
  s[4] = where;
  __threadfence_system();
  s[1] = code;
  __threadfence_system();
}

// Wait until the flag pair at f reaches epoch; check its sig. False (and status set) on
// timeout (1), abort (2) or mismatch (3). `shown`: the epoch the status names, when the flag
// value is more than the epoch (round flags); 0: epoch itself.
__device__ bool wait_flag(const u64* f, u64 epoch, u64 sig, i64* status, u64 timeout_ns, int peer, int where,
                          u64 shown = 0) {
  const u64 named = shown ? shown : epoch;
  u64 v = ld_acquire(f);
  if (v < epoch) {
    // The status words live in host memory: a read crosses PCIe (and, in a VM, the IOMMU),
    // which was seen to cost ~300 us. Read them at most once per millisecond of waiting.
    volatile i64* s = status;
    const u64 start = gtime();
    u64 next = start + 1000000;
    unsigned spins = 0;
    while ((v = ld_acquire(f)) < epoch) {
      if ((++spins & 255) == 0) {
        const u64 now = gtime();
        if (now >= next) {
          if (s[0] != 0 || s[1] != 0) {
            report(status, 2, named, peer, where);
            return false;
          }
          if (now - start > timeout_ns) {
            report(status, 1, named, peer, where);
            return false;
          }
          next = gtime() + 1000000;
        }
      }
    }
  }
  // A peer already past this epoch checked our sig against its own; only compare at equality.
  if (v == epoch && ld_relaxed(f + 1) != sig) {
    report(status, 3, named, peer, where);
    return false;
  }
  return true;
}

__device__ __forceinline__ void signal(u64* region, int b, int me, u64 epoch, u64 sig) {
  u64* f = region + (b * MAXR + me) * 2;
  st_relaxed(f + 1, sig);
  st_release(f, epoch);
}

// Every block tells the same block of every peer that it reached flag region `off` in this
// epoch, then waits for theirs (thread r waits for peer r). False in a thread whose wait
// failed (timeout, abort, mismatched call: see wait_flag; `where` names the step).
__device__ __forceinline__ bool exchange_flags_at(const u64* tab, i64 off, int rank, int nranks, u64 value,
                                                  u64 shown, u64 sig, i64* status, u64 timeout_ns, int where) {
  if (threadIdx.x == 0) {
    __threadfence_system();
    for (int r = 0; r < nranks; r++)
      if (r != rank) signal((u64*)tab[r] + off, blockIdx.x, rank, value, sig);
  }
  if (threadIdx.x < nranks && threadIdx.x != rank) {
    const u64* f = (const u64*)tab[rank] + off + (blockIdx.x * MAXR + threadIdx.x) * 2;
    return wait_flag(f, value, sig, status, timeout_ns, threadIdx.x, where, shown);
  }
  return true;
}
__device__ __forceinline__ bool exchange_flags(const u64* tab, i64 off, int rank, int nranks, u64 epoch,
                                               u64 sig, i64* status, u64 timeout_ns, int where) {
  return exchange_flags_at(tab, off, rank, nranks, epoch, 0, sig, status, timeout_ns, where);
}

// ---- the epoch, kept on the device ------------------------------------------------------------
// ectr[0] is the epoch of this rank's latest collective, ectr[1] counts the blocks of the
// running kernel that are done. Every kernel that synchronises with its peers takes ectr (not
// an epoch value): all its blocks read ectr[0] + 1 at the start, and the last block to finish
// publishes it. So a kernel replayed from a CUDA graph gets a new epoch on every replay, as an
// eagerly launched one does, and the host needs no per-call state. Kernels of one rank run one
// after another (one stream order), so the next kernel reads the published value.
__device__ __forceinline__ u64 epoch_begin(const u64* ectr) {
  __shared__ u64 e;
  if (threadIdx.x == 0) e = *(volatile const u64*)ectr + 1;
  __syncthreads();
  return e;
}
__device__ __forceinline__ void epoch_end(u64* ectr, u64 epoch) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(ectr + 1, 1ULL) == (u64)(gridDim.x - 1)) {
      ectr[1] = 0;
      __threadfence();
      *(volatile u64*)ectr = epoch;
    }
  }
}

// ---- element types ----------------------------------------------------------------------------
template <typename T> struct Acc {
  typedef T A;
  static __device__ __forceinline__ A to(T x) { return x; }
  static __device__ __forceinline__ T from(A x) { return x; }
};
template <> struct Acc<f16_t> {
  typedef float A;
  static __device__ __forceinline__ float to(f16_t x) { return f16_to_float(x); }
  static __device__ __forceinline__ f16_t from(float x) { return float_to_f16(x); }
};
template <> struct Acc<bf16_t> {
  typedef float A;
  static __device__ __forceinline__ float to(bf16_t x) { return bf16_to_float(x); }
  static __device__ __forceinline__ bf16_t from(float x) { return float_to_bf16(x); }
};
template <> struct Acc<signed char> {
  typedef int A;
  static __device__ __forceinline__ int to(signed char x) { return x; }
  static __device__ __forceinline__ signed char from(int x) { return (signed char)x; }
};
template <> struct Acc<unsigned char> {
  typedef int A;
  static __device__ __forceinline__ int to(unsigned char x) { return x; }
  static __device__ __forceinline__ unsigned char from(int x) { return (unsigned char)x; }
};

// OP: 0 sum, 1 prod, 2 min, 3 max (NaN-propagating like np.minimum/np.maximum: ties give b)
template <int OP, typename A> __device__ __forceinline__ A apply(A a, A b) {
  if (OP == 0) return a + b;
  if (OP == 1) return a * b;
  if (OP == 2) return (a < b || a != a) ? a : b;
  return (a > b || a != a) ? a : b;
}

// Round to T, then AVG divides the rounded (for integers: wrapped) sum, like the CPU path.
template <typename T> __device__ __forceinline__ T finish(typename Acc<T>::A acc, int avg_n) {
  T r = Acc<T>::from(acc);
  if (avg_n) r = Acc<T>::from(Acc<T>::to(r) / (typename Acc<T>::A)avg_n);
  return r;
}

template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };

template <int B> struct Raw;
template <> struct Raw<16> { typedef uint4 t; };
template <> struct Raw<8> { typedef uint2 t; };
template <> struct Raw<4> { typedef unsigned int t; };
template <> struct Raw<2> { typedef unsigned short t; };
template <> struct Raw<1> { typedef unsigned char t; };

// Load bypassing L1 (data written by peers in this kernel's lifetime).
template <typename T, int N> __device__ __forceinline__ Pack<T, N> ldcg(const Pack<T, N>* p) {
  typedef typename Raw<sizeof(Pack<T, N>)>::t R;
  Pack<T, N> v;
  *reinterpret_cast<R*>(&v) = __ldcg(reinterpret_cast<const R*>(p));   // same size and alignment
  return v;
}

// acc (op)= pack, or acc = pack for the first source.
template <typename T, int OP, int N>
__device__ __forceinline__ void fold(typename Acc<T>::A (&acc)[N], const Pack<T, N>& p, bool first) {
#pragma unroll
  for (int j = 0; j < N; j++) {
    typename Acc<T>::A v = Acc<T>::to(p.v[j]);
    acc[j] = first ? v : apply<OP>(acc[j], v);
  }
}

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> finish_pack(typename Acc<T>::A (&acc)[N], int avg_n) {
  Pack<T, N> o;
#pragma unroll
  for (int j = 0; j < N; j++) o.v[j] = finish<T>(acc[j], avg_n);
  return o;
}

// This block's share [p0, p1) of `npk` packs split over the grid.
__device__ __forceinline__ void share(i64 npk, i64& p0, i64& p1) {
  i64 per = (npk + gridDim.x - 1) / gridDim.x;
  p0 = per * blockIdx.x;
  if (p0 > npk) p0 = npk;
  p1 = p0 + per;
  if (p1 > npk) p1 = npk;
}

