// Decode tiles whose warps split the keys (Traits KEY_WARPS > 1): the merge of a row group's
// partial softmax results at the end of the key loop (a merge of common/softmax_state.cuh).
#pragma once
#include "flash/mma.cuh"
#include "flash/online_softmax.cuh"

namespace cupy_paged {
namespace flash {

// KEY_WARPS > 1: the KEY_WARPS warps of row group row_warp hold partial results of the same
// rows over disjoint key slices: o and l carry 2^-m of their own reference max m (l already
// quad-reduced). Rescales each to the group's max and adds them, in key-warp order (so the sum
// is deterministic), into the leading warp's o and st; the others' are left meaningless.
// scratch: Traits::MERGE_BYTES of shared memory nobody else uses now. Every thread calls it.
template <class Tr, int MF, int DF>
__device__ __forceinline__ void merge_key_warps(float (&o)[MF][DF][4], RowState (&st)[MF][2],
                                                float* scratch, int row_warp, int key_warp,
                                                int lane) {
  constexpr int R = Tr::WARP_ROWS;
  float* m_s = scratch;                      // [WARPS][R]
  float* l_s = m_s + Tr::WARPS * R;          // [WARPS][R]
  float* o_s = l_s + Tr::WARPS * R;          // [WARPS][R][HEAD]
  const int group0 = row_warp * Tr::KEY_WARPS;
  const int w = group0 + key_warp;
  if ((lane & 3) == 0) {
#pragma unroll
    for (int mf = 0; mf < MF; ++mf)
#pragma unroll
      for (int h = 0; h < 2; ++h) m_s[w * R + mf * 16 + (lane >> 2) + 8 * h] = st[mf][h].m;
  }
  __syncthreads();
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = mf * 16 + (lane >> 2) + 8 * h;
      float mx = softmax::neg_inf();
#pragma unroll
      for (int kw = 0; kw < Tr::KEY_WARPS; ++kw) mx = fmaxf(mx, m_s[(group0 + kw) * R + r]);
      const float f = st[mf][h].rebase(mx);  // mx >= m; 0 for a slice that saw no key
#pragma unroll
      for (int d = 0; d < DF; ++d) {
        o[mf][d][2 * h] *= f;
        o[mf][d][2 * h + 1] *= f;
      }
      if (key_warp != 0) {
        float* dst = o_s + (w * R + r) * Tr::HEAD + (lane & 3) * 2;
#pragma unroll
        for (int d = 0; d < DF; ++d)
          *reinterpret_cast<float2*>(dst + d * 8) =
              make_float2(o[mf][d][2 * h], o[mf][d][2 * h + 1]);
        if ((lane & 3) == 0) l_s[w * R + r] = st[mf][h].l;
      }
    }
  __syncthreads();
  if (key_warp != 0) return;
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = mf * 16 + (lane >> 2) + 8 * h;
#pragma unroll
      for (int kw = 1; kw < Tr::KEY_WARPS; ++kw) {
        const float* src = o_s + ((group0 + kw) * R + r) * Tr::HEAD + (lane & 3) * 2;
#pragma unroll
        for (int d = 0; d < DF; ++d) {
          const float2 v = *reinterpret_cast<const float2*>(src + d * 8);
          o[mf][d][2 * h] += v.x;
          o[mf][d][2 * h + 1] += v.y;
        }
        st[mf][h].l += l_s[(group0 + kw) * R + r];
      }
    }
}

// The end of the key loop: full row sums, no copy in flight (the output is staged in sQ next),
// and with KEY_WARPS > 1 the K/V stages, idle now, carry each row group's partial results to
// its leading warp (key_warp 0), which alone writes the output.
template <class Tr, int MF, int DF>
__device__ __forceinline__ void finalize_rows(float (&o)[MF][DF][4], RowState (&st)[MF][2],
                                              unsigned char* kv_stages, int row_warp,
                                              int key_warp, int lane) {
  reduce_row_sums(st);
  cp_async_wait<0>();
  __syncthreads();
  if constexpr (Tr::KEY_WARPS > 1)
    merge_key_warps<Tr>(o, st, reinterpret_cast<float*>(kv_stages), row_warp, key_warp, lane);
}

}  // namespace flash
}  // namespace cupy_paged
