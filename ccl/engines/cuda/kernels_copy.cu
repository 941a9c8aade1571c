// ---- SM copies (copy collectives on more than two GPUs) ---------------------------------------
// Up to MAXR copies (d[c] <- s[c], n[c] bytes), pushes (remote d) or pulls (remote s). The
// 16-byte packs of all copies form one range that the grid splits evenly; U loads per thread
// are in flight before their stores. The caller guarantees d[c] and s[c] are 16-byte aligned
// when n[c] >= 16; the n[c] % 16 tail bytes go byte by byte (last block).
#if KERNELS_COMMON || defined(KERNEL_ONLY_copy_n)
extern "C" __global__ void __launch_bounds__(512) copy_n(u64 d0, u64 d1, u64 d2, u64 d3, u64 d4, u64 d5, u64 d6,
                                                        u64 d7, u64 s0, u64 s1, u64 s2, u64 s3, u64 s4, u64 s5,
                                                        u64 s6, u64 s7, u64 n0, u64 n1, u64 n2, u64 n3, u64 n4,
                                                        u64 n5, u64 n6, u64 n7, int ncopies) {
  constexpr int U = 4;
  const u64 dd[MAXR] = {d0, d1, d2, d3, d4, d5, d6, d7};
  const u64 ss[MAXR] = {s0, s1, s2, s3, s4, s5, s6, s7};
  const u64 nn[MAXR] = {n0, n1, n2, n3, n4, n5, n6, n7};
  i64 tot = 0;
#pragma unroll
  for (int c = 0; c < MAXR; c++)
    if (c < ncopies) tot += (i64)(nn[c] >> 4);
  i64 p0, p1;
  share(tot, p0, p1);
  const int bd = blockDim.x;
  i64 off = 0;
#pragma unroll
  for (int c = 0; c < MAXR; c++) {
    if (c >= ncopies) break;
    const i64 np = (i64)(nn[c] >> 4);
    i64 a = p0 > off ? p0 : off, b = p1 < off + np ? p1 : off + np;
    if (a < b) {
      const uint4* src = reinterpret_cast<const uint4*>(ss[c]);
      uint4* dst = reinterpret_cast<uint4*>(dd[c]);
      for (i64 i = a - off + threadIdx.x; i < b - off; i += (i64)U * bd) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; u++)
          if (i + (i64)u * bd < b - off) v[u] = __ldcg(src + i + (i64)u * bd);
#pragma unroll
        for (int u = 0; u < U; u++)
          if (i + (i64)u * bd < b - off) dst[i + (i64)u * bd] = v[u];
      }
    }
    off += np;
  }
  if (blockIdx.x == gridDim.x - 1)
    for (int c = 0; c < ncopies && c < MAXR; c++) {
      const u64 full = nn[c] & ~(u64)15;
      for (u64 e = full + threadIdx.x; e < nn[c]; e += bd)
        reinterpret_cast<unsigned char*>(dd[c])[e] = reinterpret_cast<const unsigned char*>(ss[c])[e];
    }
}
#endif

// ---- plain local reduction of up to MAXR sources (copy-engine two-shot) -----------------------
template <typename T, int OP, int N>
__global__ void __launch_bounds__(512) reduce_n(T* out, i64 count, u64 s0, u64 s1, u64 s2, u64 s3, u64 s4,
                                               u64 s5, u64 s6, u64 s7, int nsrc, int avg_n) {
  typedef Pack<T, N> P;
  const u64 ss[MAXR] = {s0, s1, s2, s3, s4, s5, s6, s7};
  const i64 npk = count / N;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < npk; i += (i64)gridDim.x * blockDim.x) {
    typename Acc<T>::A acc[N];
#pragma unroll
    for (int r = 0; r < MAXR; r++) {
      if (r >= nsrc) break;
      fold<T, OP, N>(acc, ldcg(reinterpret_cast<const P*>(ss[r]) + i), r == 0);
    }
    reinterpret_cast<P*>(out)[i] = finish_pack<T, N>(acc, avg_n);
  }
  if (blockIdx.x == gridDim.x - 1)
    for (i64 e = npk * N + threadIdx.x; e < count; e += blockDim.x) {
      typename Acc<T>::A acc[1];
      for (int r = 0; r < nsrc; r++) fold<T, OP, 1>(acc, ldcg(reinterpret_cast<const Pack<T, 1>*>(ss[r]) + e), r == 0);
      out[e] = finish<T>(acc[0], avg_n);
    }
}

// ---- stream barrier across the ranks (orders copy-engine work between processes) --------------
#if KERNELS_COMMON || defined(KERNEL_ONLY_barrier)
extern "C" __global__ void barrier(const u64* tab, int rank, int nranks, u64* ectr, u64 sig, i64* status,
                                   u64 timeout_ns, int where) {
  const int t = threadIdx.x;
  const u64 epoch = epoch_begin(ectr);
  if (t < nranks && t != rank) {
    __threadfence_system();
    signal((u64*)tab[t] + OFF_BAR, 0, rank, epoch, sig);
    wait_flag((const u64*)tab[rank] + OFF_BAR + t * 2, epoch, sig, status, timeout_ns, t, where);
  }
  epoch_end(ectr, epoch);
}
#endif

// ---- copy collectives through the peers' scratch (no peer buffer, no host exchange) ------------
// all-gather, broadcast, all-to-all with equal pieces, gather and scatter in one launch, as the
// 'kernel' two-shot moves its segments: (A) push piece s[r] (n[r] bytes) into region `rank` of
// rank r's two-shot scratch (push half), and copy the own piece (own_src -> own_dst) locally;
// (B) signal and wait for the same block of every peer; (C) copy region q of the own scratch
// (m[q] bytes: what rank q pushed) to d[q]; (D) closing flags, so that the next collective may
// push into the scratch again (the two-shot's rule: a rank pushes into a peer's scratch only
// after that peer's previous collective closed). The piece rank r pushes to rank q has the size
// rank q drains from r (the host derives both from the call, which the sig checks), and every
// piece is cut into the same per-block slices, so block b only waits for block b of its peers.
// No rank needs to know a peer's buffer: the host exchanges nothing per call.
template <typename W>
__device__ __forceinline__ void copy_span(char* d, const char* s, i64 a, i64 b) {
  const i64 w = (i64)sizeof(W);
  const i64 i1 = b / w;
  for (i64 i = a / w + threadIdx.x; i < i1; i += blockDim.x)
    reinterpret_cast<W*>(d)[i] = __ldcg(reinterpret_cast<const W*>(s) + i);
  for (i64 e = i1 * w + threadIdx.x; e < b; e += blockDim.x)
    reinterpret_cast<unsigned char*>(d)[e] = __ldcg(reinterpret_cast<const unsigned char*>(s) + e);
}

// Bytes [a, b) of s to the same offsets of d, by this block's threads; the widest word both
// pointers allow (a: a multiple of 16).
__device__ __forceinline__ void copy_part(char* d, const char* s, i64 a, i64 b) {
  if (a >= b) return;
  const u64 al = (u64)d | (u64)s;
  if ((al & 15) == 0) copy_span<uint4>(d, s, a, b);
  else if ((al & 7) == 0) copy_span<unsigned long long>(d, s, a, b);
  else if ((al & 3) == 0) copy_span<unsigned int>(d, s, a, b);
  else copy_span<unsigned char>(d, s, a, b);
}

// This block's slice of an n-byte piece: 16-byte units split over the grid (share), the tail
// bytes to the last block.
__device__ __forceinline__ void copy_slice(char* d, const char* s, i64 n) {
  if (n <= 0 || d == s) return;
  i64 p0, p1;
  share(n >> 4, p0, p1);
  copy_part(d, s, p0 * 16, blockIdx.x == gridDim.x - 1 ? n : p1 * 16);
}

#if KERNELS_COMMON || defined(KERNEL_ONLY_staged)
extern "C" __global__ void __launch_bounds__(512) staged(const u64* tab, i64 cap_bytes,
    u64 s0, u64 s1, u64 s2, u64 s3, u64 s4, u64 s5, u64 s6, u64 s7,
    i64 n0, i64 n1, i64 n2, i64 n3, i64 n4, i64 n5, i64 n6, i64 n7,
    u64 d0, u64 d1, u64 d2, u64 d3, u64 d4, u64 d5, u64 d6, u64 d7,
    i64 m0, i64 m1, i64 m2, i64 m3, i64 m4, i64 m5, i64 m6, i64 m7,
    u64 own_dst, u64 own_src, i64 own_n, int rank, int nranks, u64* ectr, u64 sig, i64* status,
    u64 timeout_ns) {
  __shared__ int fail;
  const u64 epoch = epoch_begin(ectr);
  if (threadIdx.x == 0) fail = 0;
  const u64 ss[MAXR] = {s0, s1, s2, s3, s4, s5, s6, s7};
  const i64 nn[MAXR] = {n0, n1, n2, n3, n4, n5, n6, n7};
  const u64 dd[MAXR] = {d0, d1, d2, d3, d4, d5, d6, d7};
  const i64 mm[MAXR] = {m0, m1, m2, m3, m4, m5, m6, m7};
  // (A)
  for (int r = 0; r < nranks; r++)
    if (r != rank) copy_slice((char*)tab[2 * MAXR + r] + (i64)rank * cap_bytes, (const char*)ss[r], nn[r]);
  copy_slice((char*)own_dst, (const char*)own_src, own_n);
  // (B)
  __syncthreads();
  if (!exchange_flags(tab, OFF_FA, rank, nranks, epoch, sig, status, timeout_ns, 8)) fail = 1;
  __syncthreads();
  if (fail) {
    epoch_end(ectr, epoch);
    return;
  }
  // (C)
  const char* scratch = (const char*)tab[2 * MAXR + rank];
  for (int q = 0; q < nranks; q++)
    if (q != rank) copy_slice((char*)dd[q], scratch + (i64)q * cap_bytes, mm[q]);
  // (D)
  __syncthreads();
  exchange_flags(tab, OFF_FE, rank, nranks, epoch, sig, status, timeout_ns, 9);
  epoch_end(ectr, epoch);
}
#endif

// ---- all-to-all whose split sizes are in device memory (MoE dispatch without a host sync) ------
// (R), shared by both kernels below: every block writes this rank's row (what it sends to every
// rank, its input and output capacity, what it expects from every rank and whether it said so)
// into slot epoch & 1 of every rank's table (OFF_SPL), then signals; after the wait every rank
// holds every row, so each computes the same offsets and finds the same inconsistency, if any
// (then every rank reports a mismatch and no byte moves). Two slots: a rank's table slot is
// rewritten two collectives later, when every peer is past reading it (the same argument as the
// one-shot's scratch slots). Thread 0 fills, in bytes: src_off[r] / cnt[r], my piece for rank r
// in my input; dst_off[r], where it lands in r's output; rdst[q] / rcnt[q], where what q sends
// me lands in my output and its size; and *rounds, the most chunk-byte rounds any piece needs.
// ins / outs: the counts (elements) as given; has_outs: whether outs holds expectations.
__device__ __forceinline__ bool split_table(const i64* ins, const i64* outs, int has_outs, i64 in_cap,
                                            i64 out_cap, i64 item, const u64* tab, int rank, int nranks,
                                            u64 epoch, u64 sig, i64* status, u64 timeout_ns, i64 chunk,
                                            i64* src_off, i64* cnt, i64* dst_off, i64* rdst, i64* rcnt,
                                            i64* rounds) {
  __shared__ int fail;
  const i64 slot_off = OFF_SPL + (i64)(epoch & 1) * MAXR * SPL_ROW;
  if (threadIdx.x == 0) {
    fail = 0;
    for (int t = 0; t < nranks; t++) {
      i64* row = (i64*)tab[t] + slot_off + rank * SPL_ROW;
      for (int j = 0; j < nranks; j++) st_relaxed((u64*)row + j, (u64)ins[j]);
      st_relaxed((u64*)row + MAXR, (u64)in_cap);
      st_relaxed((u64*)row + MAXR + 1, (u64)out_cap);
      for (int j = 0; j < nranks; j++) st_relaxed((u64*)row + MAXR + 2 + j, has_outs ? (u64)outs[j] : 0);
      st_relaxed((u64*)row + 2 * MAXR + 2, has_outs ? 1 : 0);
    }
  }
  __syncthreads();
  if (!exchange_flags(tab, OFF_FA, rank, nranks, epoch, sig, status, timeout_ns, 6)) fail = 1;
  __syncthreads();
  if (threadIdx.x == 0 && !fail) {
    const i64* T = (const i64*)tab[rank] + slot_off;          // T[q * SPL_ROW + r]: q sends to r
    int bad = -1;
    for (int q = 0; q < nranks && bad < 0; q++) {
      i64 sent = 0, got = 0;
      for (int r = 0; r < nranks; r++) {
        const i64 v = (i64)ld_relaxed((const u64*)T + q * SPL_ROW + r);
        if (v < 0) bad = q;
        sent += v;
        got += (i64)ld_relaxed((const u64*)T + r * SPL_ROW + q);
      }
      if (sent > (i64)ld_relaxed((const u64*)T + q * SPL_ROW + MAXR) ||
          got > (i64)ld_relaxed((const u64*)T + q * SPL_ROW + MAXR + 1))
        bad = q;                                                // q sends more than it has or gets more than fits
    }
    for (int r = 0; r < nranks && bad < 0; r++)              // every rank checks every expectation
      if (ld_relaxed((const u64*)T + r * SPL_ROW + 2 * MAXR + 2))
        for (int q = 0; q < nranks; q++)
          if (ld_relaxed((const u64*)T + q * SPL_ROW + r) != ld_relaxed((const u64*)T + r * SPL_ROW + MAXR + 2 + q))
            bad = r;
    if (bad >= 0) {
      report(status, 3, epoch, bad, 6);
      fail = 1;
    } else {
      i64 so = 0, ro = 0, most = 0;
      for (int r = 0; r < nranks; r++) {
        i64 d = 0;
        for (int q = 0; q < rank; q++) d += (i64)ld_relaxed((const u64*)T + q * SPL_ROW + r);
        cnt[r] = (i64)ld_relaxed((const u64*)T + rank * SPL_ROW + r) * item;
        src_off[r] = so;
        dst_off[r] = d * item;
        so += cnt[r];
        rcnt[r] = (i64)ld_relaxed((const u64*)T + r * SPL_ROW + rank) * item;
        rdst[r] = ro;
        ro += rcnt[r];
        for (int q = 0; q < nranks; q++)                      // the same on every rank
          if (q != r) {
            const i64 v = (i64)ld_relaxed((const u64*)T + q * SPL_ROW + r) * item;
            if (v > most) most = v;
          }
      }
      *rounds = chunk > 0 ? (most + chunk - 1) / chunk : 0;
    }
  }
  __syncthreads();
  return !fail;
}

// The mailbox flavour: in_splits[r] (int64 elements, this GPU): what this rank sends to rank r;
// out_splits (or 0): what it expects from every rank, checked. (R) above; (C) each rank pushes
// its piece for rank r to out[r] (rank r's output as mapped here, named through the host
// mailbox) at the sum of what lower ranks send to r. (E) closing flags: the output is complete
// on return, and buffers and table may be reused.
#if KERNELS_COMMON || defined(KERNEL_ONLY_alltoallv)
extern "C" __global__ void __launch_bounds__(512) alltoallv(const char* in, const i64* in_splits, const i64* out_splits,
                                                           i64 in_cap, i64 out_cap, i64 item, const u64* tab,
                                                           u64 o0, u64 o1, u64 o2, u64 o3, u64 o4, u64 o5, u64 o6,
                                                           u64 o7, int rank, int nranks, u64* ectr, u64 sig,
                                                           i64* status, u64 timeout_ns) {
  __shared__ i64 src_off[MAXR], dst_off[MAXR], cnt[MAXR], rdst[MAXR], rcnt[MAXR], rounds;
  const u64 epoch = epoch_begin(ectr);
  const u64 oo[MAXR] = {o0, o1, o2, o3, o4, o5, o6, o7};
  if (split_table(in_splits, out_splits, out_splits != 0, in_cap, out_cap, item, tab, rank, nranks, epoch, sig,
                  status, timeout_ns, 0, src_off, cnt, dst_off, rdst, rcnt, &rounds))
    for (int r = 0; r < nranks; r++) copy_slice((char*)oo[r] + dst_off[r], in + src_off[r], cnt[r]);
  __syncthreads();
  exchange_flags(tab, OFF_FE, rank, nranks, epoch, sig, status, timeout_ns, 7);
  epoch_end(ectr, epoch);
}
#endif

// The scratch flavour: no peer buffer, so no host exchange per call (and a capture needs none).
// Split sizes from device memory (in_splits / out_splits, or 0) or, for host splits, from the
// parameters h (what this rank sends) and e (what it expects, when has_e). (R) above; then the
// pieces go in rounds of `chunk` bytes through the peers' two-shot scratch (region `rank` of
// each, `region` bytes apart): push my round-t part of every piece into its receiver's scratch,
// flags, copy what every peer pushed out of my scratch into my output, flags again (the peers
// may then push round t+1). Every block owns the same span of every region in every round (not
// a share of each round's length), so block b only ever waits for block b of its peers. The
// round flags (OFF_RP, OFF_RC) carry epoch << 20 | round + 1: they grow across calls, and only
// this kernel uses them. The own piece is copied straight from input to output.
#if KERNELS_COMMON || defined(KERNEL_ONLY_alltoallv_staged)
extern "C" __global__ void __launch_bounds__(512) alltoallv_staged(
    const char* in, const i64* in_splits, const i64* out_splits, i64 in_cap, i64 out_cap, i64 item,
    const u64* tab, char* out, i64 region, i64 h0, i64 h1, i64 h2, i64 h3, i64 h4, i64 h5, i64 h6, i64 h7,
    i64 e0, i64 e1, i64 e2, i64 e3, i64 e4, i64 e5, i64 e6, i64 e7, int has_e, int rank, int nranks,
    u64* ectr, u64 sig, i64* status, u64 timeout_ns) {
  __shared__ i64 src_off[MAXR], dst_off[MAXR], cnt[MAXR], rdst[MAXR], rcnt[MAXR], rounds, ins[MAXR], outs[MAXR];
  __shared__ int stop;
  const u64 epoch = epoch_begin(ectr);
  const i64 span = (region / gridDim.x) & ~15LL;            // this block's bytes of every region
  const i64 chunk = span * gridDim.x;
  if (threadIdx.x == 0) {
    stop = 0;
    const i64 hh[MAXR] = {h0, h1, h2, h3, h4, h5, h6, h7};
    const i64 ee[MAXR] = {e0, e1, e2, e3, e4, e5, e6, e7};
    for (int r = 0; r < nranks; r++) {
      ins[r] = in_splits ? in_splits[r] : hh[r];
      outs[r] = out_splits ? out_splits[r] : ee[r];
    }
  }
  __syncthreads();
  const bool ok = split_table(ins, outs, out_splits != 0 || has_e, in_cap, out_cap, item, tab, rank, nranks,
                              epoch, sig, status, timeout_ns, chunk, src_off, cnt, dst_off, rdst, rcnt, &rounds);
  if (ok) {
    copy_slice(out + rdst[rank], in + src_off[rank], cnt[rank]);
    const char* mine = (const char*)tab[2 * MAXR + rank];
    const i64 a0 = (i64)blockIdx.x * span;
    for (i64 t = 0; t < rounds; t++) {
      const i64 lo = t * chunk, a = lo + a0, b = a + span;
      for (int r = 0; r < nranks; r++)                        // piece bytes [a, b) -> region offset - lo
        if (r != rank && a < cnt[r])
          copy_part((char*)tab[2 * MAXR + r] + (i64)rank * region - lo, in + src_off[r], a, min(b, cnt[r]));
      __syncthreads();
      const u64 flag = (epoch << 20) | (u64)(t + 1);
      if (!exchange_flags_at(tab, OFF_RP, rank, nranks, flag, epoch, sig, status, timeout_ns, 10)) stop = 1;
      __syncthreads();
      if (stop) break;
      for (int q = 0; q < nranks; q++)
        if (q != rank && a < rcnt[q])
          copy_part(out + rdst[q], mine + (i64)q * region - lo, a, min(b, rcnt[q]));
      __syncthreads();
      if (!exchange_flags_at(tab, OFF_RC, rank, nranks, flag, epoch, sig, status, timeout_ns, 11)) stop = 1;
      __syncthreads();
      if (stop) break;
    }
  }
  epoch_end(ectr, epoch);
}
#endif
