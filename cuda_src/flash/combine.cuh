// Split-KV merge (flash-decoding's second pass): out = sum_s w_s O_s with w_s proportional to
// 2^lse_s, in a fixed split order (deterministic, no atomics): a merge of normalised partial
// states (common/softmax_state.cuh). A row no split saw is 0.
#pragma once
#include "common/dtypes.cuh"
#include "common/pdl.cuh"
#include "common/score_transform.cuh"
#include "common/softmax_state.cuh"
#include "flash/params.cuh"

namespace cupy_paged {
namespace flash {

// The kernel is latency-bound (a few thousand threads, each with two dependent rounds of
// loads), so a row's splits go kCombineChunk at a time with every load of a chunk in flight
// together: first the lse (for the max), then the partial outputs; the first chunk's lse stay
// in registers between the two rounds.
constexpr int kCombineChunk = 16;

// Loads of splits past num_splits read the last split instead (always in bounds; their
// weight is 0), so no load needs a predicate and all of a chunk's are in flight together.
__device__ __forceinline__ int clamp_split(int s, int num_splits) {
  return min(s, num_splits - 1);
}

// The lse of splits s0 .. s0 + K - 1 of one row (-inf past num_splits).
template <int K>
__device__ __forceinline__ void load_lse(float (&lse)[K], const float* __restrict__ partial_lse,
                                         long long row, long long split_stride, int s0,
                                         int num_splits) {
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const float x = partial_lse[clamp_split(s0 + j, num_splits) * split_stride + row];
    lse[j] = s0 + j < num_splits ? x : softmax::neg_inf();
  }
}

// Adds splits s0 .. s0 + K - 1 (lse: theirs) of one row's 4 channels at c, weighted by
// 2^(lse - mx), to acc and wsum: every load first, then the sums in split order. (A clamped
// split's partial output is finite, or NaN in a poisoned row, which ends NaN anyway.)
template <int K>
__device__ __forceinline__ void add_splits(float (&acc)[4], float& wsum, const float (&lse)[K],
                                           float mx, const float* __restrict__ partial_o,
                                           long long row, long long split_stride, int s0,
                                           int num_splits, int head_size, int c) {
  float4 v[K];
#pragma unroll
  for (int j = 0; j < K; ++j)
    v[j] = *reinterpret_cast<const float4*>(
        partial_o + (clamp_split(s0 + j, num_splits) * split_stride + row) * head_size + c);
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const float w = s0 + j < num_splits ? softmax::merge_weight(lse[j], mx) : 0.0f;
    wsum += w;
    acc[0] += w * v[j].x;
    acc[1] += w * v[j].y;
    acc[2] += w * v[j].z;
    acc[3] += w * v[j].w;
  }
}

// out's 4 channels at c of one row: the merge of its num_splits partial states, with the row's
// head sink (log2 units; -inf: none) in the denominator.
template <typename T>
__device__ __forceinline__ void combine_row(const float* __restrict__ partial_o,
                                            const float* __restrict__ partial_lse,
                                            T* __restrict__ out, long long row, int c, int rows,
                                            int head_size, int num_splits, float sink) {
  constexpr int K = kCombineChunk;
  const long long split_stride = rows;  // between one split's lse of a row and the next's
  float first[K];  // lse of splits 0 .. K - 1, kept for the second pass
  load_lse(first, partial_lse, row, split_stride, 0, num_splits);
  float mx = softmax::neg_inf();
  bool poisoned = false;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    poisoned |= isnan(first[j]);
    mx = fmaxf(mx, first[j]);
  }
  for (int s0 = K; s0 < num_splits; s0 += K) {
    float lse[K];
    load_lse(lse, partial_lse, row, split_stride, s0, num_splits);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      poisoned |= isnan(lse[j]);
      mx = fmaxf(mx, lse[j]);
    }
  }
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float wsum = 0.0f;
  if (mx != softmax::neg_inf()) {  // else every weight is 0: no split saw a key
    mx = fmaxf(mx, sink);          // the weights' reference covers the sink too
    wsum = softmax::sink_term(sink, mx);
    add_splits(acc, wsum, first, mx, partial_o, row, split_stride, 0, num_splits, head_size, c);
    for (int s0 = K; s0 < num_splits; s0 += K) {
      float lse[K];
      load_lse(lse, partial_lse, row, split_stride, s0, num_splits);
      add_splits(acc, wsum, lse, mx, partial_o, row, split_stride, s0, num_splits, head_size,
                 c);
    }
  }
  float inv = softmax::inv_sum(wsum);
  if (poisoned) inv = __int_as_float(0x7fc00000);  // NaN
  uint2 packed;
  packed.x = pack2<T>(acc[0] * inv, acc[1] * inv);
  packed.y = pack2<T>(acc[2] * inv, acc[3] * inv);
  *reinterpret_cast<uint2*>(out + row * head_size + c) = packed;
}

// partial_o: (num_splits, rows, H) fp32, each split's normalised output; partial_lse:
// (num_splits, rows), log2 of each split's sum of 2^score (-inf: the split saw no key);
// out: (rows, H) = (T, N*H). One thread per 4 channels of a row, grid-stride. fault: null, or
// the metadata guard's flags: fault[batch] != 0 leaves out alone (the guard wrote NaN rows);
// a row of a faulted sequence has NaN partial sums (written by the forward kernel) and gets NaN.
// Launched programmatically after the forward kernel (common/pdl.cuh): waits for it first.
template <typename T>
__device__ __forceinline__ void combine(const CombineParams& p) {
  pdl::wait();  // the partial sums are the forward kernel's
  if (p.fault != nullptr && p.fault[p.batch] != 0) return;
  const int quads = p.head_size / 4;
  const long long items = static_cast<long long>(p.rows) * quads;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long row = i / quads;
    const int c = static_cast<int>(i - row * quads) * 4;
    const float sink =
        p.head_sink == nullptr
            ? softmax::neg_inf()
            : to_float(static_cast<const T*>(p.head_sink)[row % p.num_heads]) * kLog2e;
    combine_row(p.partial_o, p.partial_lse, static_cast<T*>(p.out), row, c, p.rows,
                p.head_size, p.num_splits, sink);
  }
}

}  // namespace flash
}  // namespace cupy_paged
