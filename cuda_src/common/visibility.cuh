// Which keys a query sees (docs/semantics.md): key position k is visible from absolute
// query position p (past + index in the sequence) iff k <= p (bottom-right causal) and, with a
// sliding window W > 0, k > p - W. A key in an unmapped block is never visible (the kernels
// mask it from the block table: flash through its key offsets, mea through key_ok).
#pragma once

namespace cupy_paged {

__host__ __device__ __forceinline__ constexpr bool key_visible(int k, int p, int window) {
  return k <= p && (window <= 0 || k > p - window);
}

// The rule as column bounds of one row, computed once per row so that a score costs two
// compares: key key0 + j is visible from position p iff lo < j <= hi.
struct VisibleColumns {
  int lo, hi;

  __host__ __device__ __forceinline__ constexpr VisibleColumns(int p, int key0, int window)
      : lo(window > 0 ? p - key0 - window : -(1 << 30)), hi(p - key0) {}
  __host__ __device__ __forceinline__ constexpr bool contains(int j) const {
    return j <= hi && j > lo;
  }
};

// Whether some key of [k_first, k_last] is hidden from some position of [p_first, p_last]: the
// last key from the first position (causal) or the first key from the last position (window).
// A tile where neither happens is fully visible and needs no per-score mask.
__host__ __device__ __forceinline__ constexpr bool partly_hidden(int k_first, int k_last,
                                                                 int p_first, int p_last,
                                                                 int window) {
  return k_last > p_first || (window > 0 && k_first <= p_last - window);
}

}  // namespace cupy_paged
