// The online softmax on MMA fragments (common/softmax_state.cuh's RowState per fragment row):
// reference row max / sum in registers, lazy output rescale, exponents in base 2.
#pragma once
#include "common/softmax_state.cuh"

namespace cupy_paged {
namespace flash {

using softmax::RowState;

// One tile, in two steps so that a kernel may run something between them (the sm90a kernel's
// P V MMA of the previous tile, which owns o until it completes): softmax_tile turns the scores
// s (fragment layout, flash/scores.cuh) into probabilities 2^(s scale - m) (scale: scale log2 e
// on raw scores, 1 on softcapped ones) and moves the rows' states st (m in scaled units,
// quad-uniform; l this thread's partial sum), leaving in corr the factor each row's output must
// be multiplied by and in `moved` whether any row's m moved; rescale_output applies it to o
// (o[mf][d][e]: row as s, channel 8 d + 2 (lane % 4) + (e % 2)), skipped when no row of the warp
// moved (the lazy rescale of common/softmax_state.cuh).
template <int MF, int NF>
__device__ __forceinline__ void softmax_tile(float (&s)[MF][NF][4], RowState (&st)[MF][2],
                                             float scale, float (&corr)[MF][2], bool& moved) {
#pragma unroll
  for (int mf = 0; mf < MF; ++mf) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = softmax::neg_inf();
#pragma unroll
      for (int nf = 0; nf < NF; ++nf)
        mx = fmaxf(mx, fmaxf(s[mf][nf][2 * h], s[mf][nf][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      corr[mf][h] = st[mf][h].update(mx * scale, moved);  // -inf stays -inf (scale > 0)
      const float m_use = st[mf][h].offset();
      float sum = 0.0f;
#pragma unroll
      for (int nf = 0; nf < NF; ++nf)
#pragma unroll
        for (int e = 2 * h; e < 2 * h + 2; ++e) {
          const float pr = fast_exp2(fmaf(s[mf][nf][e], scale, -m_use));
          s[mf][nf][e] = pr;
          sum += pr;
        }
      st[mf][h].add(corr[mf][h], sum);
    }
  }
}

template <int MF, int DF>
__device__ __forceinline__ void rescale_output(float (&o)[MF][DF][4], const float (&corr)[MF][2],
                                               bool moved) {
  if (__any_sync(0xffffffffu, moved)) {  // warp-uniform: skip the O rescale when no row moved
#pragma unroll
    for (int mf = 0; mf < MF; ++mf)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int d = 0; d < DF; ++d) {
          o[mf][d][2 * h] *= corr[mf][h];
          o[mf][d][2 * h + 1] *= corr[mf][h];
        }
  }
}

// Both steps at once (the sm80 kernel).
template <int MF, int NF, int DF>
__device__ __forceinline__ void online_softmax(float (&s)[MF][NF][4], float (&o)[MF][DF][4],
                                               RowState (&st)[MF][2], float scale) {
  float corr[MF][2];
  bool moved = false;
  softmax_tile(s, st, scale, corr, moved);
  rescale_output(o, corr, moved);
}

// Full row sums from the four lanes of a quad (each held a quarter of the columns).
template <int MF>
__device__ __forceinline__ void reduce_row_sums(RowState (&st)[MF][2]) {
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      st[mf][h].l += __shfl_xor_sync(0xffffffffu, st[mf][h].l, 1);
      st[mf][h].l += __shfl_xor_sync(0xffffffffu, st[mf][h].l, 2);
    }
}

}  // namespace flash
}  // namespace cupy_paged
