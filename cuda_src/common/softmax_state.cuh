// The online softmax of one row, in the log2 domain: logits are scores times log2(e) (folded
// into the score transform), so every exponential is one exp2. A row's state after some keys is
// (m, l): m a reference max of its logits (-inf until it sees a key), l the sum of 2^(logit - m);
// its output accumulator o carries the same 2^-m. The functions below move that state when a
// tile of logits arrives, merge partial states over disjoint keys, and normalise at the end.
// A row that sees no key keeps m = -inf, l = 0, o = 0 and ends as o = 0, lse = -inf (never NaN).
#pragma once
#include "common/fast_math.cuh"

namespace cupy_paged {
namespace softmax {

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Lazy rescaling: m moves up to a tile's max (rescaling o and l) only when that max exceeds it
// by more than kRescaleLog2, so most tiles of a long row skip the rescale of o. Exact: o and l
// carry the same 2^-m, which the final 1 / l cancels; probabilities stay <= 2^kRescaleLog2,
// far inside fp16 / bf16 / fp32 range.
constexpr float kRescaleLog2 = 8.0f;

// The factor o and l are multiplied by when the reference max moves from m_old up to m_new:
// 2^(m_old - m_new), 0 when m_old = -inf (nothing accumulated yet).
__device__ __forceinline__ float rescale_factor(float m_old, float m_new) {
  return fast_exp2(m_old - m_new);
}

// What a row's exponents subtract: m, or 0 while the row has seen no key (its logits are all
// -inf, and 2^(-inf - 0) = 0 where 2^(-inf - -inf) would be NaN).
__device__ __forceinline__ float exponent_offset(float m) { return m == neg_inf() ? 0.0f : m; }

// Merge of partial states over disjoint keys: part i, of max m_i, is weighted by
// 2^(m_i - m_max), m_max = max_i m_i; every weight is 0 when no part saw a key (m_max = -inf).
__device__ __forceinline__ float merge_weight(float m, float m_max) {
  return m_max == neg_inf() ? 0.0f : fast_exp2(m - m_max);
}

// Finalize: the factor that normalises o, 1 / l, or 0 for a row that saw no key.
__device__ __forceinline__ float inv_sum(float l) {
  return l > 0.0f ? __fdividef(1.0f, l) : 0.0f;
}

// A head sink (docs/semantics.md): a logit `sink` (log2 units; -inf: none) that joins the
// softmax denominator and adds no value. Its term in a denominator whose terms carry 2^-m:
// 2^(sink - m), or 0 for a row that saw no key (m = -inf: its o is 0 and stays 0). Overflow
// (sink far above every logit) gives inf, and the row's output 0, its limit.
__device__ __forceinline__ float sink_term(float sink, float m) {
  return m == neg_inf() ? 0.0f : fast_exp2(sink - m);
}

// The same rule for an epilogue that divides by the sum itself: l, or 1 for a row that saw no
// key (its o is 0 and stays 0).
__device__ __forceinline__ float divisor(float l) { return l > 0.0f ? l : 1.0f; }

// log2 of the row's sum of 2^logit: m + log2(l), or -inf for a row that saw no key.
__device__ __forceinline__ float lse(float m, float l) {
  return l > 0.0f ? m + __log2f(l) : neg_inf();
}

// One row's (m, l) in registers.
struct RowState {
  float m;  // reference max, logit units; -inf until the row sees a key
  float l;  // sum of 2^(logit - m) over the keys seen (by this thread, for a fragment row)

  __device__ __forceinline__ static RowState empty() { return {neg_inf(), 0.0f}; }

  // A tile of max m_tile arrives (lazy rule): returns the factor o and l must be multiplied by
  // (1 when m stays) and sets `moved` when m moves.
  __device__ __forceinline__ float update(float m_tile, bool& moved) {
    float corr = 1.0f;
    if (m_tile > m + kRescaleLog2) {  // false for -inf; true on the first keys
      corr = rescale_factor(m, m_tile);  // 0 when m was -inf
      m = m_tile;
      moved = true;
    }
    return corr;
  }
  __device__ __forceinline__ float offset() const { return exponent_offset(m); }
  // l after the rescale by corr and the tile's sum of 2^(logit - m)
  __device__ __forceinline__ void add(float corr, float tile_sum) { l = fmaf(l, corr, tile_sum); }
  // Rescales to a merge's max m_max >= m (merge_weight); returns the factor for o.
  __device__ __forceinline__ float rebase(float m_max) {
    const float w = merge_weight(m, m_max);
    m = m_max;
    l *= w;
    return w;
  }
  __device__ __forceinline__ float inv_sum() const { return softmax::inv_sum(l); }
  // 1 / (l + the sink's term): the factor that normalises o with a head sink (log2 units).
  __device__ __forceinline__ float inv_sum(float sink) const {
    return softmax::inv_sum(l + sink_term(sink, m));
  }
  __device__ __forceinline__ float lse() const { return softmax::lse(m, l); }
};

}  // namespace softmax
}  // namespace cupy_paged
