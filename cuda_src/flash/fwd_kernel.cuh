// The flash forward kernel: one CTA per (query tile of one sequence, kv head, key split). The G
// query heads of a kv head are packed into the tile's rows (row = token * G + g), so K/V tiles
// are read once per kv head and a decode step still fills the MMA's 16 rows.
#pragma once
#include "common/pdl.cuh"
#include "flash/key_warps.cuh"
#include "flash/mma.cuh"
#include "flash/online_softmax.cuh"
#include "flash/paged_tiles.cuh"
#include "flash/params.cuh"
#include "flash/traits.cuh"

namespace cupy_paged {
namespace flash {

// Sequence b owns grid tiles [first_tile(b), first_tile(b + 1)), first_tile(b) = ceil(cum[b] G /
// BM) + b: strictly increasing, ceil(cum[B] G / BM) + B in all, and at least the
// ceil(q_len G / BM) tiles b needs. Known from cum alone: no host data, no sync.
template <int BM>
__device__ __forceinline__ long long first_tile(const int* cum, int b, int group) {
  return (static_cast<long long>(cum[b]) * group + BM - 1) / BM + b;
}

// The b in [0, batch) with first_tile(b) <= tile < first_tile(b + 1) (binary search).
template <int BM>
__device__ __forceinline__ int sequence_of_tile(const int* cum, int batch, int group,
                                                long long tile) {
  int lo = 0, hi = batch;
  while (hi - lo > 1) {
    const int mid = lo + (hi - lo) / 2;
    if (first_tile<BM>(cum, mid, group) <= tile) lo = mid; else hi = mid;
  }
  return lo;
}

// A faulted sequence's split CTA: NaN partial sums for its rows, so the combine writes NaN rows
// (the guard has already written NaN there; the combine would otherwise overwrite them).
// Not inlined: kept out of the main kernel's register allocation.
template <int BM, int THREADS>
__device__ __noinline__ void poison_partials(float* partial_lse, long long first_row,
                                             int num_heads, int group, int head0, int row0,
                                             int rows, int tid) {
  for (int r = tid; r < BM && row0 + r < rows; r += THREADS) {
    const int row = row0 + r, j = row / group;
    partial_lse[(first_row + j) * num_heads + head0 + (row - j * group)] =
        __int_as_float(0x7fc00000);
  }
}

template <class Tr>
__device__ __forceinline__ void fwd(const FwdParams& p) {
  using T = typename Tr::T;
  using L = typename Tr::Layout;
  constexpr int MF = Tr::MFRAG, NF = Tr::NFRAG, DF = Tr::DFRAG, ROW_BYTES = Tr::ROW_BYTES;
  constexpr unsigned KV_BYTES = Tr::KV_BYTES;
  // 128-byte alignment: the swizzled layout's address arithmetic needs whole lines
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* const sQ = smem_raw;                   // BM rows; reused to stage the output
  unsigned char* const sK = sQ + Tr::Q_BYTES;           // STAGES x BN rows
  unsigned char* const sV = sK + Tr::STAGES * KV_BYTES;  // STAGES x BN rows
  unsigned char* const side = sV + Tr::STAGES * KV_BYTES;  // key side data (swizzled layout)
  const unsigned q_addr = smem_addr(sQ), k_addr = smem_addr(sK), v_addr = smem_addr(sV);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // blockIdx.x = tile * kv_heads + kvh: the kv heads of one query tile are neighbours in the
  // launch order, so CTAs running together read the same cache blocks' token rows (the Nkv
  // heads of a token are adjacent in the cache) rather than 1 / Nkv of each of many blocks.
  const int tile_x = static_cast<int>(blockIdx.x / p.kv_heads);
  const int kvh = static_cast<int>(blockIdx.x - tile_x * p.kv_heads);
  const int split = blockIdx.z, G = p.group, H = p.head_size;
  // This warp's rows (its row group) and its slice of every key tile (all keys when
  // KEY_WARPS == 1).
  const int row_warp = warp / Tr::KEY_WARPS, key_warp = warp % Tr::KEY_WARPS;
  const int key_off = key_warp * Tr::WARP_KEYS;

  // May be launched programmatically after the prologue (common/pdl.cuh; the plan decides,
  // _flash_kernels.overlap_launches): until pdl::wait() below, only the call's inputs (cum,
  // past, block_table) and the guard's verdict (complete: every prologue CTA lets this kernel
  // start only after its own wait for the guard) are read, and every CTA waits before it exits.
  // The guard found cum unusable: nothing maps rows to sequences; it wrote every row NaN.
  if (p.fault != nullptr && p.fault[p.batch] != 0) {
    pdl::wait();
    return;
  }
  // Heavy tiles (last rows of long sequences see the most keys) are launched first.
  const long long tile = static_cast<long long>(gridDim.x / p.kv_heads) - 1 - tile_x;
  const int b = sequence_of_tile<Tr::BM>(p.cum, p.batch, G, tile);
  const int q_begin = p.cum[b];
  const int q_len = p.cum[b + 1] - q_begin;
  const int rows = q_len * G;
  const long long m_block = tile - first_tile<Tr::BM>(p.cum, b, G);
  if (m_block < 0 || m_block * Tr::BM >= rows) {  // CTA-uniform, before any barrier
    pdl::wait();
    return;
  }
  const int row0 = static_cast<int>(m_block) * Tr::BM;
  if (p.fault != nullptr && p.fault[b] != 0) {  // faulted sequence: its rows stay NaN
    pdl::wait();  // the previous call's combine has read the partial sums
    if (p.num_splits > 1)
      poison_partials<Tr::BM, Tr::THREADS>(
          p.partial_lse, static_cast<long long>(split) * p.num_tokens + q_begin, p.num_heads, G,
          kvh * G, row0, rows, tid);
    return;
  }
  const int past = p.past[b];
  const int p_first = past + row0 / G;                            // position of the first row
  const int p_last = past + (min(row0 + Tr::BM, rows) - 1) / G;   // ... and of the last

  // Key tiles [t_lo, t_hi) hold every key some row of the tile may see: from the first row's
  // window start to the last row's causal end; split `split` takes an even share of them.
  const int k_lo = p.window > 0 ? max(p_first - p.window + 1, 0) : 0;
  const int t_lo = k_lo / Tr::BN;
  const int t_hi = p_last >= 0 ? p_last / Tr::BN + 1 : 0;
  const int n_tiles = max(t_hi - t_lo, 0);
  const int per_split = (n_tiles + p.num_splits - 1) / p.num_splits;
  const int my_lo = t_lo + min(split * per_split, n_tiles);
  const int my_hi = t_lo + min((split + 1) * per_split, n_tiles);

  PagedSeq<T> seq;
  seq.key_cache = static_cast<const T*>(p.key_cache) + static_cast<long long>(kvh) * H;
  seq.value_cache = static_cast<const T*>(p.value_cache) + static_cast<long long>(kvh) * H;
  seq.table_row = p.block_table + static_cast<long long>(b) * p.max_blocks;
  seq.token_stride = p.kv_heads * H;
  seq.kv_len = past + q_len;
  seq.max_blocks = p.max_blocks;
  seq.num_blocks = p.num_blocks;
  seq.blocks = BlockDiv{p.block_size, p.block_shift, p.block_magic, p.block_magic_shift};

  // Key side data of the tile bound for stage st (Layout::offsets, Layout::flags): row r's
  // byte offset in the cache, and its loadable flag (padded rows keep them in the V and K row
  // pads, which the copies and ldmatrix never touch). Iteration kt issues the copies of tile
  // kt + STAGES - 1 from its offsets and looks up tile kt + STAGES, bound for the stage being
  // computed, into that stage's offsets.
  auto slot = [&](int st) { return L::offsets(sK, sV, side, st); };
  auto flags = [&](int st) { return L::flags(sK, sV, side, st); };

  // Prologue: the offsets of tiles my_lo .. my_lo + STAGES - 1 (block-table reads: before the
  // wait for the prologue kernel), then Q and the first STAGES - 1 K/V tiles, one commit group
  // per tile (Q rides in the first). hole_bits bit s: this thread saw an unloadable key in the
  // tile of stage s.
#pragma unroll
  for (int s = 0; s < Tr::STAGES; ++s) {
    const int t = my_lo + s;
    if (t < my_hi) {
      KeyRowOffsets<Tr> offsets;
      offsets.look_up(seq, t * Tr::BN, tid);
      offsets.store(seq, slot(s), tid);
    }
  }
  __syncthreads();
  pdl::wait();  // q (rotated) and the new keys and values are the prologue kernel's
  pdl::launch_dependents();  // the combine (split-KV) may start; it waits for this kernel
  load_q_tile<Tr>(q_addr, static_cast<const T*>(p.q), q_begin, row0, rows, G, kvh * G,
                  p.num_heads, H, tid);
  unsigned hole_bits = 0;
#pragma unroll
  for (int s = 0; s < Tr::STAGES - 1; ++s) {
    const int t = my_lo + s;
    if (t < my_hi) {
      const bool h = load_kv_tile<Tr>(k_addr + s * KV_BYTES, v_addr + s * KV_BYTES, slot(s),
                                      flags(s), seq, H, tid);
      hole_bits |= static_cast<unsigned>(h) << s;
    }
    cp_async_commit();
  }

  int pos[MF][2];  // absolute positions of this thread's rows
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      pos[mf][h] = past + (row0 + row_warp * Tr::WARP_ROWS + mf * 16 + (lane >> 2) + 8 * h) / G;

  float o[MF][DF][4], m[MF][2], l[MF][2];
#pragma unroll
  for (int mf = 0; mf < MF; ++mf) {
#pragma unroll
    for (int d = 0; d < DF; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mf][d][e] = 0.0f;
    m[mf][0] = m[mf][1] = neg_inf();
    l[mf][0] = l[mf][1] = 0.0f;
  }

  const bool capped = p.cap_in > 0.0f;
  const float softmax_scale = capped ? 1.0f : p.scale_log2;  // softcapped scores: log2 domain
  // Shared-memory byte addresses of this lane's ldmatrix rows in the warp's Q rows, and in
  // stage 0 of its K and V key slice: every fragment address below is L::step of one of these
  // plus the stage's offset plus a compile-time multiple of 16 rows (padded rows: one
  // LDSM [R + imm] each; swizzled rows: an XOR as well).
  const unsigned q_lane =
      L::lane_base(q_addr, row_warp * Tr::WARP_ROWS + (lane & 15), lane >> 4);
  const unsigned k_lane =
      L::lane_base(k_addr, key_off + (lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1);
  const unsigned v_lane = L::lane_base(v_addr, key_off + (lane & 15), lane >> 4);
  int stage = 0;
  for (int kt = my_lo; kt < my_hi; ++kt) {
    // Tile kt + STAGES's block-table loads go out first: they need no shared memory, and their
    // latency then overlaps the wait below as well as this tile's MMAs (a decode tile has few).
    const int ahead = kt + Tr::STAGES;
    const bool look_ahead = ahead < my_hi;
    KeyRowOffsets<Tr> ahead_offsets;
    if (look_ahead) ahead_offsets.look_up(seq, ahead * Tr::BN, tid);
    cp_async_wait<Tr::STAGES - 2>();  // tile kt has landed (for this thread) ...
    // ... for every thread; every warp is done with the stage refilled below; and tile
    // kt + STAGES - 1's offsets are visible.
    const bool hole = __syncthreads_or((hole_bits >> stage) & 1u) != 0;
    {
      const int next = kt + Tr::STAGES - 1;
      const int ns = (stage + Tr::STAGES - 1) % Tr::STAGES;
      if (next < my_hi) {
        const bool h = load_kv_tile<Tr>(k_addr + ns * KV_BYTES, v_addr + ns * KV_BYTES,
                                        slot(ns), flags(ns), seq, H, tid);
        hole_bits = (hole_bits & ~(1u << ns)) | (static_cast<unsigned>(h) << ns);
      }
      cp_async_commit();
    }
    const unsigned k_stage = k_lane + stage * KV_BYTES, v_stage = v_lane + stage * KV_BYTES;

    // S = Q K^T (fp32), 16 channels at a time; channels >= H are zero, skipped when whole.
    float s[MF][NF][4];
#pragma unroll
    for (int mf = 0; mf < MF; ++mf)
#pragma unroll
      for (int nf = 0; nf < NF; ++nf)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mf][nf][e] = 0.0f;
    // Fragments are loaded one MMA step ahead (two register sets), so an ldmatrix's latency
    // hides behind the previous step's MMAs instead of stalling the MMAs that use it.
    {
      constexpr int NP = NF / 2, STEPS = Tr::HEAD / 16 * NP;  // step = (kk, np)
      unsigned qa[2][MF][4], kf[2][4];
#pragma unroll
      for (int mf = 0; mf < MF; ++mf) ldmatrix_x4(qa[0][mf], q_lane + mf * 16 * ROW_BYTES);
      ldmatrix_x4(kf[0], k_stage);
#pragma unroll
      for (int step = 0; step < STEPS; ++step) {
        const int kk = step / NP, np = step % NP;
        if (step + 1 < STEPS) {
          const int kk1 = (step + 1) / NP, np1 = (step + 1) % NP;
          if (np1 == 0) {
#pragma unroll
            for (int mf = 0; mf < MF; ++mf)
              ldmatrix_x4(qa[kk1 & 1][mf], L::step(q_lane + mf * 16 * ROW_BYTES, kk1));
          }
          ldmatrix_x4(kf[(step + 1) & 1], L::step(k_stage + np1 * 16 * ROW_BYTES, kk1));
        }
#pragma unroll
        for (int mf = 0; mf < MF; ++mf) {
          mma_16816<T>(s[mf][2 * np], qa[kk & 1][mf], kf[step & 1][0], kf[step & 1][1]);
          mma_16816<T>(s[mf][2 * np + 1], qa[kk & 1][mf], kf[step & 1][2], kf[step & 1][3]);
        }
      }
    }

    if (capped) softcap_scores(s, p.cap_in, p.cap_out);
    const int k0 = kt * Tr::BN;
    if (k0 + Tr::BN - 1 > p_first || (p.window > 0 && k0 <= p_last - p.window))
      mask_causal_window(s, pos, k0 + key_off, p.window, lane);
    if (hole)
      mask_unloadable(s, flags(stage), key_off, lane);
    online_softmax(s, o, m, l, softmax_scale);

    // O += P V: the probabilities, rounded to T, are the A fragments (C layout == A layout);
    // packed first, so the fp32 scores are dead during the MMAs. V fragments one step ahead.
    {
      constexpr int KK = Tr::WARP_KEYS / 16, DP = Tr::HEAD / 16, STEPS = KK * DP;
      unsigned pa[MF][KK][4];
#pragma unroll
      for (int mf = 0; mf < MF; ++mf)
#pragma unroll
        for (int kk = 0; kk < KK; ++kk) {
          pa[mf][kk][0] = pack2<T>(s[mf][2 * kk][0], s[mf][2 * kk][1]);
          pa[mf][kk][1] = pack2<T>(s[mf][2 * kk][2], s[mf][2 * kk][3]);
          pa[mf][kk][2] = pack2<T>(s[mf][2 * kk + 1][0], s[mf][2 * kk + 1][1]);
          pa[mf][kk][3] = pack2<T>(s[mf][2 * kk + 1][2], s[mf][2 * kk + 1][3]);
        }
      unsigned vf[2][4];
      ldmatrix_x4_trans(vf[0], v_stage);
#pragma unroll
      for (int step = 0; step < STEPS; ++step) {  // step = (kk, dp)
        const int kk = step / DP, dp = step % DP;
        if (step + 1 < STEPS) {
          const int kk1 = (step + 1) / DP, dp1 = (step + 1) % DP;
          ldmatrix_x4_trans(vf[(step + 1) & 1], L::step(v_stage + kk1 * 16 * ROW_BYTES, dp1));
        }
#pragma unroll
        for (int mf = 0; mf < MF; ++mf) {
          mma_16816<T>(o[mf][2 * dp], pa[mf][kk], vf[step & 1][0], vf[step & 1][1]);
          mma_16816<T>(o[mf][2 * dp + 1], pa[mf][kk], vf[step & 1][2], vf[step & 1][3]);
        }
      }
    }
    // This stage's pads were last read by the copies of tile kt, issued before this
    // iteration's barrier; the next iteration's barrier publishes them.
    if (look_ahead) ahead_offsets.store(seq, slot(stage), tid);
    stage = stage + 1 == Tr::STAGES ? 0 : stage + 1;
  }

  reduce_row_sums(l);
  cp_async_wait<0>();  // no copy may land in sQ after the staging below
  __syncthreads();
  if constexpr (Tr::KEY_WARPS > 1) {
    // The K/V stages are idle now: they carry the row group's partial results to its
    // leading warp (key_warp 0), which alone writes the output below.
    merge_key_warps<Tr>(o, m, l, reinterpret_cast<float*>(sK), row_warp, key_warp, lane);
  }
  const bool writer = key_warp == 0;
  if (p.num_splits == 1) {
    // Stage the tile's output rows in sQ, then write whole 16-byte chunks to out (T, N*H).
    if (writer) {
#pragma unroll
      for (int mf = 0; mf < MF; ++mf)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float inv = l[mf][h] > 0.0f ? __fdividef(1.0f, l[mf][h]) : 0.0f;  // none: 0
          const int r = row_warp * Tr::WARP_ROWS + mf * 16 + (lane >> 2) + 8 * h;
#pragma unroll
          for (int d = 0; d < DF; ++d)
            *reinterpret_cast<unsigned*>(sQ + L::at(r, d) + (lane & 3) * 4) =
                pack2<T>(o[mf][d][2 * h] * inv, o[mf][d][2 * h + 1] * inv);
        }
    }
    __syncthreads();
    T* out = static_cast<T*>(p.out);
    using CR = ChunkRows<Tr, Tr::BM>;
    const CR cr(tid);
    if (cr.active() && cr.c * 8 < H) {
      RowWalk w(row0 + cr.r_first, CR::ROWS_PER_PASS, G);
#pragma unroll
      for (int i = 0; i < CR::PASSES; ++i) {
        if (!cr.has(i)) break;
        const int r = cr.row(i);
        if (row0 + r < rows)
          *reinterpret_cast<uint4*>(
              out + ((q_begin + w.j) * static_cast<long long>(p.num_heads) + kvh * G + w.g) *
                        H + cr.c * 8) = *reinterpret_cast<const uint4*>(sQ + L::at(r, cr.c));
        w.next();
      }
    }
  } else {
    // Split: this split's normalised output and log2-sum-exp2, fp32, for the combine kernel.
#pragma unroll
    for (int mf = 0; mf < MF; ++mf)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + row_warp * Tr::WARP_ROWS + mf * 16 + (lane >> 2) + 8 * h;
        if (!writer || row >= rows) continue;
        const int j = row / G;
        const long long ridx = (static_cast<long long>(split) * p.num_tokens + q_begin + j) *
                                   p.num_heads + static_cast<long long>(kvh) * G + (row - j * G);
        const bool seen = l[mf][h] > 0.0f;
        const float inv = seen ? __fdividef(1.0f, l[mf][h]) : 0.0f;
        float* dst = p.partial_o + ridx * H + (lane & 3) * 2;
#pragma unroll
        for (int d = 0; d < DF; ++d)
          if (d * 8 < H)
            *reinterpret_cast<float2*>(dst + d * 8) =
                make_float2(o[mf][d][2 * h] * inv, o[mf][d][2 * h + 1] * inv);
        if ((lane & 3) == 0) p.partial_lse[ridx] = seen ? m[mf][h] + __log2f(l[mf][h]) : neg_inf();
      }
  }
}

}  // namespace flash
}  // namespace cupy_paged
