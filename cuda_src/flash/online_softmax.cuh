// Scores on MMA fragments, in the order the contract fixes: s = scale * q.k, softcap
// c * tanh(s / c), then the masks (causal, window, unloadable keys), then the online softmax:
// reference row max / sum in registers, lazy output rescale, exponents in base 2 (exp2).
#pragma once
#include "flash/mma.cuh"

namespace cupy_paged {
namespace flash {

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// tanh(x) = 1 - 2 / (1 + e^{2x}): absolute error ~1e-7 (what a softmax logit needs; the
// tanh.approx instruction's 2^-11 would shift c = 50 logits by ~0.03). Saturates to +-1.
__device__ __forceinline__ float tanh_exp(float x) {
  const float e = fast_exp2(x * 2.8853900817779268f);  // 2 log2(e)
  float r;  // 1 / (1 + e), rcp.approx: ~1 ulp, and 1 / inf = 0 (x -> +inf gives 1)
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(1.0f + e));
  return 1.0f - 2.0f * r;
}

// Fragment layout (m16n8k16 accumulators): s[mf][nf][e] is row 16 mf + lane / 4 + 8 (e / 2),
// key 8 nf + 2 (lane % 4) + (e % 2) of the warp's rows and the tile's keys.
//
// With softcap on, replaces the raw q.k by c tanh(scale q.k / c) log2(e) (log2 domain; the
// softmax then runs with scale 1). Softcap off: the scores stay raw and the softmax folds
// scale * log2(e) into its exponent (one FFMA per score instead of an FMUL and an FADD).
template <int MF, int NF>
__device__ __forceinline__ void softcap_scores(float (&s)[MF][NF][4], float cap_in,
                                               float cap_out) {
  // cap_in = scale / c, cap_out = c log2 e
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int nf = 0; nf < NF; ++nf)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mf][nf][e] = tanh_exp(s[mf][nf][e] * cap_in) * cap_out;
}

// Sets to -inf every score whose key k = k0 + column is not visible from its row's position p:
// k <= p (bottom-right causal) and k > p - W when W > 0. Per row, the limits become column
// bounds once, so a score costs two compares and a select.
template <int MF, int NF>
__device__ __forceinline__ void mask_causal_window(float (&s)[MF][NF][4],
                                                   const int (&pos)[MF][2], int k0, int window,
                                                   int lane) {
  const int key0 = k0 + (lane & 3) * 2;  // key of this thread's first column
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // column j = 8 nf + e1 (key key0 + j) is visible iff lo < j <= hi
      const int hi = pos[mf][h] - key0;
      const int lo = window > 0 ? hi - window : -(1 << 30);
#pragma unroll
      for (int nf = 0; nf < NF; ++nf)
#pragma unroll
        for (int e1 = 0; e1 < 2; ++e1) {
          const int j = nf * 8 + e1;
          if (j > hi || j <= lo) s[mf][nf][2 * h + e1] = neg_inf();
        }
    }
}

// Sets to -inf every score whose key is not loadable: flags[key_off + k] is key k's flag in this
// warp's slice (written by load_kv_tile: 0 for unmapped blocks and positions >= kv_len; any
// int column, e.g. smem_layout.cuh's SideColumn<int>). Only tiles with such a key.
template <int MF, int NF, class Flags>
__device__ __forceinline__ void mask_unloadable(float (&s)[MF][NF][4], const Flags& flags,
                                                int key_off, int lane) {
#pragma unroll
  for (int nf = 0; nf < NF; ++nf)
#pragma unroll
    for (int e1 = 0; e1 < 2; ++e1) {
      const int kr = nf * 8 + (lane & 3) * 2 + e1;
      if (flags[key_off + kr] == 0) {
#pragma unroll
        for (int mf = 0; mf < MF; ++mf)
#pragma unroll
          for (int h = 0; h < 2; ++h) s[mf][nf][2 * h + e1] = neg_inf();
      }
    }
}

// Lazy rescaling (the threshold trick of FlashAttention-4, Dao et al. 2025): the exponent
// subtracts a reference max m_ref <= the row's true max, and m_ref moves up (rescaling o and l)
// only when a tile's max exceeds it by more than kRescaleLog2. Exact: every term of o and l
// carries the same 2^-m_ref, which the final 1 / l cancels; probabilities stay <= 2^8, far
// inside fp16 / bf16 / fp32 range. Most tiles of a long row then skip the O rescale, which
// costs as many FMULs as the tile has MMAs.
constexpr float kRescaleLog2 = 8.0f;

// One tile of the online softmax. s: scores in, probabilities 2^(s scale - m_ref) out (scale:
// scale log2 e on raw scores, 1 on softcapped ones); o: output accumulators (o[mf][d][e]: row
// as s, channel 8 d + 2 (lane % 4) + (e % 2)) rescaled when m_ref moves; m: the reference max
// per row in scaled units (quad-uniform; -inf until the row sees a key); l: this thread's
// partial row sum. A row that has seen only -inf keeps m = -inf, l = 0 and never produces NaN.
template <int MF, int NF, int DF>
__device__ __forceinline__ void online_softmax(float (&s)[MF][NF][4], float (&o)[MF][DF][4],
                                               float (&m)[MF][2], float (&l)[MF][2],
                                               float scale) {
  float corr[MF][2];
  bool moved = false;
#pragma unroll
  for (int mf = 0; mf < MF; ++mf) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = neg_inf();
#pragma unroll
      for (int nf = 0; nf < NF; ++nf)
        mx = fmaxf(mx, fmaxf(s[mf][nf][2 * h], s[mf][nf][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_tile = mx * scale;  // -inf stays -inf (scale > 0)
      corr[mf][h] = 1.0f;
      if (m_tile > m[mf][h] + kRescaleLog2) {  // false for -inf; true on the first keys
        corr[mf][h] = fast_exp2(m[mf][h] - m_tile);  // 0 when m was -inf
        m[mf][h] = m_tile;
        moved = true;
      }
      const float m_use = m[mf][h] == neg_inf() ? 0.0f : m[mf][h];
      float sum = 0.0f;
#pragma unroll
      for (int nf = 0; nf < NF; ++nf)
#pragma unroll
        for (int e = 2 * h; e < 2 * h + 2; ++e) {
          const float pr = fast_exp2(fmaf(s[mf][nf][e], scale, -m_use));
          s[mf][nf][e] = pr;
          sum += pr;
        }
      l[mf][h] = fmaf(l[mf][h], corr[mf][h], sum);
    }
  }
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

// Full row sums from the four lanes of a quad (each held a quarter of the columns).
template <int MF>
__device__ __forceinline__ void reduce_row_sums(float (&l)[MF][2]) {
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l[mf][h] += __shfl_xor_sync(0xffffffffu, l[mf][h], 1);
      l[mf][h] += __shfl_xor_sync(0xffffffffu, l[mf][h], 2);
    }
}

}  // namespace flash
}  // namespace cupy_paged
