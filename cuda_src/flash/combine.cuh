// Split-KV merge (flash-decoding's second pass): out = sum_s w_s O_s with w_s proportional to
// 2^lse_s, in a fixed split order (deterministic, no atomics): a merge of normalised partial
// states (common/softmax_state.cuh). A row no split saw is 0.
#pragma once
#include "common/dtypes.cuh"
#include "common/pdl.cuh"
#include "common/softmax_state.cuh"
#include "flash/params.cuh"

namespace cupy_paged {
namespace flash {

// partial_o: (num_splits, rows, H) fp32, each split's normalised output; partial_lse:
// (num_splits, rows), log2 of each split's sum of 2^score (-inf: the split saw no key);
// out: (rows, H) = (T, N*H). One thread per 4 channels of a row, grid-stride. fault: null, or
// the metadata guard's flags: fault[batch] != 0 leaves out alone (the guard wrote NaN rows);
// a row of a faulted sequence has NaN partial sums (written by the forward kernel) and gets NaN.
// Launched programmatically after the forward kernel (common/pdl.cuh): waits for it first.
template <typename T>
__device__ __forceinline__ void combine(const CombineParams& p) {
  const float* __restrict__ partial_o = p.partial_o;
  const float* __restrict__ partial_lse = p.partial_lse;
  T* __restrict__ out = static_cast<T*>(p.out);
  const int* __restrict__ fault = p.fault;
  const int rows = p.rows, head_size = p.head_size, num_splits = p.num_splits, batch = p.batch;
  pdl::wait();  // the partial sums are the forward kernel's
  if (fault != nullptr && fault[batch] != 0) return;
  const int quads = head_size / 4;
  const long long items = static_cast<long long>(rows) * quads;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long row = i / quads;
    const int c = static_cast<int>(i - row * quads) * 4;
    float mx = softmax::neg_inf();
    bool poisoned = false;
    for (int s = 0; s < num_splits; ++s) {
      const float lse = partial_lse[s * static_cast<long long>(rows) + row];
      poisoned |= isnan(lse);
      mx = fmaxf(mx, lse);
    }
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float wsum = 0.0f;
    if (mx != softmax::neg_inf()) {  // else every weight is 0: no split saw a key
      for (int s = 0; s < num_splits; ++s) {
        const long long r = s * static_cast<long long>(rows) + row;
        const float w = softmax::merge_weight(partial_lse[r], mx);
        const float4 v = *reinterpret_cast<const float4*>(partial_o + r * head_size + c);
        wsum += w;
        acc[0] += w * v.x;
        acc[1] += w * v.y;
        acc[2] += w * v.z;
        acc[3] += w * v.w;
      }
    }
    float inv = softmax::inv_sum(wsum);
    if (poisoned) inv = __int_as_float(0x7fc00000);  // NaN
    uint2 packed;
    packed.x = pack2<T>(acc[0] * inv, acc[1] * inv);
    packed.y = pack2<T>(acc[2] * inv, acc[3] * inv);
    *reinterpret_cast<uint2*>(out + row * head_size + c) = packed;
  }
}

}  // namespace flash
}  // namespace cupy_paged
