// ---- one-shot all-reduce ----------------------------------------------------------------------
// Every rank pushes its whole buffer into every peer's one-shot scratch (slot epoch & 1,
// region of the sender), signals per block, waits for the peers' blocks, and reduces all
// copies in rank order (the same order everywhere, so every rank gets bit-identical
// results). One launch, no host synchronisation. Two slots alternate, so no closing barrier
// is needed: a rank reuses slot s (epoch e + 2k) only after the collective of epoch e + 1
// (whatever it was) waited for every peer to reach e + 1, i.e. to have finished epoch e
// (each rank runs its collectives one after another on the GPU). The slot comes from the
// epoch, which the kernel reads on the device, so a call changes no kernel parameter.
template <typename T, int OP, int N>
__global__ void __launch_bounds__(512) oneshot(const T* x, T* out, i64 count, const u64* tab, i64 cap_bytes,
                                              int rank, int nranks, u64* ectr, u64 sig, i64* status,
                                              u64 timeout_ns, int avg_n) {
  typedef Pack<T, N> P;
  __shared__ int fail;
  const u64 epoch = epoch_begin(ectr);
  const int slot = (int)(epoch & 1);
  if (threadIdx.x == 0) fail = 0;
  const i64 npk = count / N;
  i64 p0, p1;
  share(npk, p0, p1);
  const bool last = blockIdx.x == gridDim.x - 1;
  const i64 slot_off = (i64)slot * nranks * cap_bytes;     // one-shot scratch: [2 slots][nranks][cap]
  char* dst[MAXR];
#pragma unroll
  for (int r = 0; r < MAXR; r++)
    dst[r] = (r < nranks && r != rank) ? (char*)tab[MAXR + r] + slot_off + (i64)rank * cap_bytes : nullptr;
  for (i64 i = p0 + threadIdx.x; i < p1; i += blockDim.x) {
    P v = reinterpret_cast<const P*>(x)[i];
#pragma unroll
    for (int r = 0; r < MAXR; r++)
      if (dst[r]) reinterpret_cast<P*>(dst[r])[i] = v;
  }
  if (last)
    for (i64 e = npk * N + threadIdx.x; e < count; e += blockDim.x) {
      T v = x[e];
#pragma unroll
      for (int r = 0; r < MAXR; r++)
        if (dst[r]) reinterpret_cast<T*>(dst[r])[e] = v;
    }
  __syncthreads();
  const i64 flag_off = OFF_ONESHOT + (i64)slot * MAXB * MAXR * 2;
  if (!exchange_flags(tab, flag_off, rank, nranks, epoch, sig, status, timeout_ns, 1)) fail = 1;
  __syncthreads();
  if (fail) {
    epoch_end(ectr, epoch);
    return;
  }
  const char* mine = (const char*)tab[MAXR + rank] + slot_off;
  for (i64 i = p0 + threadIdx.x; i < p1; i += blockDim.x) {
    typename Acc<T>::A acc[N];
#pragma unroll
    for (int r = 0; r < MAXR; r++) {
      if (r >= nranks) break;
      P v = (r == rank) ? reinterpret_cast<const P*>(x)[i]
                        : ldcg(reinterpret_cast<const P*>(mine + (i64)r * cap_bytes) + i);
      fold<T, OP, N>(acc, v, r == 0);
    }
    reinterpret_cast<P*>(out)[i] = finish_pack<T, N>(acc, avg_n);
  }
  if (last)
    for (i64 e = npk * N + threadIdx.x; e < count; e += blockDim.x) {
      typename Acc<T>::A acc[1];
      for (int r = 0; r < nranks; r++) {
        Pack<T, 1> v;
        v.v[0] = (r == rank) ? x[e] : ldcg(reinterpret_cast<const Pack<T, 1>*>(mine + (i64)r * cap_bytes) + e).v[0];
        fold<T, OP, 1>(acc, v, r == 0);
      }
      out[e] = finish<T>(acc[0], avg_n);
    }
  epoch_end(ectr, epoch);
}

// ---- two-shot: reduce-scatter (+ all-gather) in one kernel -----------------------------------
// Segment r of the input starts at in + r * stride and holds len(r) = clamp(total - r*stride,
// 0, seg_len) elements. (A) push segment r to rank r's two-shot scratch (region of the
// sender); signal; wait. (B) reduce my segment from my input and the scratch, in rank order,
// into `out`, and (all-reduce) also to each peer: d[r] = where my segment goes on rank r (0:
// reduce-scatter, nothing to send), the gather half of rank r's two-shot scratch (region of the
// sender), so no rank needs to know its peers' buffers. (C) closing flags, so that scratch and
// peer buffers may be reused by the next collective. (D) all-reduce (`gather` = the gather half
// of my scratch; 1: take d[] and the gather half from tab, where a resume puts the new scratch
// into the same table): copy every peer's reduced segment from there into my buffer (in place: the
// input's segment q). Blocks own the same slice of every segment, so each block only waits for
// the same block of its peers, and after (C) block b's slice of every region has arrived.
template <typename T, int OP, int N>
__global__ void __launch_bounds__(512) twoshot(const T* in, i64 stride, i64 seg_len, i64 total, T* out,
                                              const u64* tab, i64 cap_bytes, u64 d0, u64 d1, u64 d2, u64 d3,
                                              u64 d4, u64 d5, u64 d6, u64 d7, u64 gather, int rank, int nranks,
                                              u64* ectr, u64 sig, i64* status, u64 timeout_ns, int avg_n) {
  typedef Pack<T, N> P;
  __shared__ int fail;
  const u64 epoch = epoch_begin(ectr);
  if (threadIdx.x == 0) fail = 0;
  u64 dd[MAXR] = {d0, d1, d2, d3, d4, d5, d6, d7};
  if (gather == 1) {   // the scratch's gather halves, read from tab (re-made by a resume: same launch)
#pragma unroll
    for (int r = 0; r < MAXR; r++)
      dd[r] = (r < nranks && r != rank) ? tab[2 * MAXR + r] + (u64)(nranks + rank) * cap_bytes : 0;
    gather = tab[2 * MAXR + rank] + (u64)nranks * cap_bytes;
  }
  const i64 npk_seg = seg_len / N;
  i64 p0, p1;
  share(npk_seg, p0, p1);
  const bool last = blockIdx.x == gridDim.x - 1;
  // (A)
#pragma unroll
  for (int r = 0; r < MAXR; r++) {
    if (r >= nranks || r == rank) continue;
    i64 len = total - r * stride;
    len = len < 0 ? 0 : (len > seg_len ? seg_len : len);
    const i64 npk = len / N;
    const T* src = in + r * stride;
    char* dst = (char*)tab[2 * MAXR + r] + (i64)rank * cap_bytes;
    const i64 q1 = p1 < npk ? p1 : npk;
    for (i64 i = p0 + threadIdx.x; i < q1; i += blockDim.x)
      reinterpret_cast<P*>(dst)[i] = reinterpret_cast<const P*>(src)[i];
    if (last)
      for (i64 e = npk * N + threadIdx.x; e < len; e += blockDim.x) reinterpret_cast<T*>(dst)[e] = src[e];
  }
  __syncthreads();
  if (!exchange_flags(tab, OFF_FA, rank, nranks, epoch, sig, status, timeout_ns, 2)) fail = 1;
  __syncthreads();
  if (fail) {
    epoch_end(ectr, epoch);
    return;
  }
  // (B)
  {
    i64 len = total - rank * stride;
    len = len < 0 ? 0 : (len > seg_len ? seg_len : len);
    const i64 npk = len / N;
    const T* own = in + rank * stride;
    const char* scratch = (const char*)tab[2 * MAXR + rank];
    const i64 q1 = p1 < npk ? p1 : npk;
    for (i64 i = p0 + threadIdx.x; i < q1; i += blockDim.x) {
      typename Acc<T>::A acc[N];
#pragma unroll
      for (int r = 0; r < MAXR; r++) {
        if (r >= nranks) break;
        P v = (r == rank) ? reinterpret_cast<const P*>(own)[i]
                          : ldcg(reinterpret_cast<const P*>(scratch + (i64)r * cap_bytes) + i);
        fold<T, OP, N>(acc, v, r == 0);
      }
      P o = finish_pack<T, N>(acc, avg_n);
      reinterpret_cast<P*>(out)[i] = o;
#pragma unroll
      for (int r = 0; r < MAXR; r++)
        if (dd[r]) reinterpret_cast<P*>(dd[r])[i] = o;
    }
    if (last)
      for (i64 e = npk * N + threadIdx.x; e < len; e += blockDim.x) {
        typename Acc<T>::A acc[1];
        for (int r = 0; r < nranks; r++) {
          Pack<T, 1> v;
          v.v[0] = (r == rank) ? own[e]
                               : ldcg(reinterpret_cast<const Pack<T, 1>*>(scratch + (i64)r * cap_bytes) + e).v[0];
          fold<T, OP, 1>(acc, v, r == 0);
        }
        T o = finish<T>(acc[0], avg_n);
        out[e] = o;
        for (int r = 0; r < nranks; r++)
          if (dd[r]) reinterpret_cast<T*>(dd[r])[e] = o;
      }
  }
  // (C)
  __syncthreads();
  if (!exchange_flags(tab, OFF_FE, rank, nranks, epoch, sig, status, timeout_ns, 3)) fail = 1;
  __syncthreads();
  // (D)
  if (gather && !fail) {
#pragma unroll
    for (int q = 0; q < MAXR; q++) {
      if (q >= nranks || q == rank) continue;
      i64 len = total - q * stride;
      len = len < 0 ? 0 : (len > seg_len ? seg_len : len);
      const i64 npk = len / N;
      const char* src = (const char*)gather + (i64)q * cap_bytes;
      T* dst = const_cast<T*>(in) + q * stride;
      const i64 q1 = p1 < npk ? p1 : npk;
      for (i64 i = p0 + threadIdx.x; i < q1; i += blockDim.x)
        reinterpret_cast<P*>(dst)[i] = ldcg(reinterpret_cast<const P*>(src) + i);
      if (last)
        for (i64 e = npk * N + threadIdx.x; e < len; e += blockDim.x)
          dst[e] = ldcg(reinterpret_cast<const Pack<T, 1>*>(src) + e).v[0];
    }
  }
  epoch_end(ectr, epoch);
}

// ---- pull two-shot: every rank reads its segment from the peers' buffers (no scratch) -----------
// b[r] = rank r's buffer as mapped here (b[rank]: ours). Segment q of every buffer starts at
// b[.] + q * stride and holds len(q) = clamp(total - q*stride, 0, seg_len) elements.
// (S) each block says "my input is ready" (start flags) and waits for the same block of every
// peer. (A) reduce segment `rank` from every buffer, in rank order (the same order as the push
// kernel, so results are bit-identical), into `out`. gather (all-reduce, in place: out is our
// own segment): (F) signal, wait for the same block of every peer to have reduced its segment,
// (B) copy segment q of rank q into our buffer for every peer q. (E) closing flags: a rank's
// buffer may be read by its peers until they signal. Blocks own the same slice of every
// segment, so each block only waits for the same block of its peers. Reads of peer memory are
// L1-bypassing 16-byte loads, U packs per thread in flight from every source at once.
template <typename T, int OP, int N>
__global__ void __launch_bounds__(512) twoshot_pull(i64 stride, i64 seg_len, i64 total, T* out, const u64* tab,
                                                   u64 b0, u64 b1, u64 b2, u64 b3, u64 b4, u64 b5, u64 b6,
                                                   u64 b7, int rank, int nranks, int gather, u64* ectr, u64 sig,
                                                   i64* status, u64 timeout_ns, int avg_n) {
  typedef Pack<T, N> P;
  constexpr int U = 2, UA = 1;     // packs per thread in flight per source: gather, reduce
  __shared__ int fail;
  const u64 epoch = epoch_begin(ectr);
  if (threadIdx.x == 0) fail = 0;
  const u64 bb[MAXR] = {b0, b1, b2, b3, b4, b5, b6, b7};
  const i64 npk_seg = seg_len / N;
  i64 p0, p1;
  share(npk_seg, p0, p1);
  const bool last = blockIdx.x == gridDim.x - 1;
  const int bd = blockDim.x;
  // (S)
  __syncthreads();
  if (!exchange_flags(tab, OFF_FS, rank, nranks, epoch, sig, status, timeout_ns, 2)) fail = 1;
  __syncthreads();
  if (fail) {
    epoch_end(ectr, epoch);
    return;
  }
  // (A)
  {
    i64 len = total - rank * stride;
    len = len < 0 ? 0 : (len > seg_len ? seg_len : len);
    const i64 npk = len / N;
    const i64 q1 = p1 < npk ? p1 : npk;
    for (i64 i = p0 + threadIdx.x; i < q1; i += (i64)UA * bd) {
      P v[UA][MAXR];
#pragma unroll
      for (int u = 0; u < UA; u++) {
        const i64 k = i + (i64)u * bd;
        if (k < q1) {
#pragma unroll
          for (int r = 0; r < MAXR; r++)
            if (r < nranks) v[u][r] = ldcg(reinterpret_cast<const P*>((const T*)bb[r] + rank * stride) + k);
        }
      }
#pragma unroll
      for (int u = 0; u < UA; u++) {
        const i64 k = i + (i64)u * bd;
        if (k < q1) {
          typename Acc<T>::A acc[N];
#pragma unroll
          for (int r = 0; r < MAXR; r++)
            if (r < nranks) fold<T, OP, N>(acc, v[u][r], r == 0);
          reinterpret_cast<P*>(out)[k] = finish_pack<T, N>(acc, avg_n);
        }
      }
    }
    if (last)
      for (i64 e = npk * N + threadIdx.x; e < len; e += bd) {
        typename Acc<T>::A acc[1];
        for (int r = 0; r < nranks; r++) {
          Pack<T, 1> v;
          v.v[0] = ldcg(reinterpret_cast<const Pack<T, 1>*>((const T*)bb[r] + rank * stride) + e).v[0];
          fold<T, OP, 1>(acc, v, r == 0);
        }
        out[e] = finish<T>(acc[0], avg_n);
      }
  }
  if (gather) {
    // (F)
    __syncthreads();
    if (!exchange_flags(tab, OFF_FA, rank, nranks, epoch, sig, status, timeout_ns, 2)) fail = 1;
    __syncthreads();
    if (fail) {
      epoch_end(ectr, epoch);
      return;
    }
    // (B): U packs from every peer in flight at once
    T* own = (T*)bb[rank];
    for (i64 i = p0 + threadIdx.x; i < p1; i += (i64)U * bd) {
      P v[U][MAXR];
#pragma unroll
      for (int u = 0; u < U; u++) {
        const i64 k = i + (i64)u * bd;
#pragma unroll
        for (int r = 0; r < MAXR; r++) {
          if (r >= nranks || r == rank) continue;
          i64 len = total - r * stride;
          len = len < 0 ? 0 : (len > seg_len ? seg_len : len);
          if (k < p1 && k < len / N) v[u][r] = ldcg(reinterpret_cast<const P*>((const T*)bb[r] + r * stride) + k);
        }
      }
#pragma unroll
      for (int u = 0; u < U; u++) {
        const i64 k = i + (i64)u * bd;
#pragma unroll
        for (int r = 0; r < MAXR; r++) {
          if (r >= nranks || r == rank) continue;
          i64 len = total - r * stride;
          len = len < 0 ? 0 : (len > seg_len ? seg_len : len);
          if (k < p1 && k < len / N) reinterpret_cast<P*>(own + r * stride)[k] = v[u][r];
        }
      }
    }
    if (last)
      for (int r = 0; r < nranks; r++) {
        if (r == rank) continue;
        i64 len = total - r * stride;
        len = len < 0 ? 0 : (len > seg_len ? seg_len : len);
        for (i64 e = (len / N) * N + threadIdx.x; e < len; e += bd)
          own[r * stride + e] = ldcg(reinterpret_cast<const Pack<T, 1>*>((const T*)bb[r] + r * stride) + e).v[0];
      }
  }
  // (E)
  __syncthreads();
  exchange_flags(tab, OFF_FE, rank, nranks, epoch, sig, status, timeout_ns, 3);
  epoch_end(ectr, epoch);
}

