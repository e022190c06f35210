// The flash forward kernel's results: the tile's normalised output rows (one split), or this
// split's normalised partial rows and their log2-sum-exp2 for the combine (flash/combine.cuh).
#pragma once
#include "common/dtypes.cuh"
#include "common/score_transform.cuh"
#include "flash/cta_tile.cuh"
#include "flash/online_softmax.cuh"
#include "flash/paged_tiles.cuh"

namespace cupy_paged {
namespace flash {

// The sink logit of tile row r's query head (log2 units), or -inf without head sinks.
template <class Tr>
__device__ __forceinline__ float row_sink(const FwdParams& p, const CtaTile& t, int r) {
  if (p.head_sink == nullptr) return softmax::neg_inf();
  const int row = t.row0 + r, head = t.kvh * t.group + row % t.group;
  return to_float(static_cast<const typename Tr::T*>(p.head_sink)[head]) * kLog2e;
}

// Stages the tile's output rows (o / (l + sink term), rounded to T) in sQ, then writes whole
// 16-byte chunks to out (T, N*H). Only the leading warp of each row group holds results
// (flash/key_warps.cuh).
template <class Tr, int MF, int DF>
__device__ __forceinline__ void write_output(const FwdParams& p, const CtaTile& t,
                                             const WarpRole<Tr>& me, unsigned char* sQ,
                                             const float (&o)[MF][DF][4],
                                             const RowState (&st)[MF][2]) {
  using T = typename Tr::T;
  using L = typename Tr::Layout;
  const int G = t.group, H = t.head_size;
  if (me.key_warp == 0) {
#pragma unroll
    for (int mf = 0; mf < MF; ++mf)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = me.row(mf, h);
        const float inv = st[mf][h].inv_sum(row_sink<Tr>(p, t, r));
#pragma unroll
        for (int d = 0; d < DF; ++d)
          *reinterpret_cast<unsigned*>(sQ + L::at(r, d) + (me.lane & 3) * 4) =
              pack2<T>(o[mf][d][2 * h] * inv, o[mf][d][2 * h + 1] * inv);
      }
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out);
  using CR = ChunkRows<Tr, Tr::BM>;
  const CR cr(me.tid);
  if (cr.active() && cr.c * 8 < H) {
    RowWalk w(t.row0 + cr.r_first, CR::ROWS_PER_PASS, G);
#pragma unroll
    for (int i = 0; i < CR::PASSES; ++i) {
      if (!cr.has(i)) break;
      const int r = cr.row(i);
      if (t.row0 + r < t.rows)
        *reinterpret_cast<uint4*>(
            out + ((t.q_begin + w.j) * static_cast<long long>(p.num_heads) + t.kvh * G + w.g) *
                      H + cr.c * 8) = *reinterpret_cast<const uint4*>(sQ + L::at(r, cr.c));
      w.next();
    }
  }
}

// Split: this split's normalised output and log2-sum-exp2, fp32, for the combine kernel (which
// adds the head sink, once per row).
template <class Tr, int MF, int DF>
__device__ __forceinline__ void write_partials(const FwdParams& p, const CtaTile& t,
                                               const WarpRole<Tr>& me,
                                               const float (&o)[MF][DF][4],
                                               const RowState (&st)[MF][2]) {
  const int G = t.group, H = t.head_size;
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = t.row0 + me.row(mf, h);
      if (me.key_warp != 0 || row >= t.rows) continue;
      const int j = row / G;
      const long long ridx = (static_cast<long long>(t.split) * p.num_tokens + t.q_begin + j) *
                                 p.num_heads + static_cast<long long>(t.kvh) * G + (row - j * G);
      const float inv = st[mf][h].inv_sum();
      float* dst = p.partial_o + ridx * H + (me.lane & 3) * 2;
#pragma unroll
      for (int d = 0; d < DF; ++d)
        if (d * 8 < H)
          *reinterpret_cast<float2*>(dst + d * 8) =
              make_float2(o[mf][d][2 * h] * inv, o[mf][d][2 * h + 1] * inv);
      if ((me.lane & 3) == 0) p.partial_lse[ridx] = st[mf][h].lse();
    }
}

}  // namespace flash
}  // namespace cupy_paged
