// Entry points of the paged fMHA ("mea" backend). cupy_paged/backends/_mea_kernels.py generates
// one CUPY_PAGED_MEA_ENTRY line per instantiation after this file; each defines a plain-argument
// extern "C" kernel (CuPy cannot pass structs) and its launch facts as a readable global.
#include "guard/fault_codes.cuh"
#include "mea/fmha_paged.cuh"

namespace cupy_paged {
namespace mea {

// Whether this block's sequence (blockIdx.z) may run: not stopped by the metadata guard (fault:
// its (B+1,) verdict, B = gridDim.z, or nullptr), and its ranges inside the arrays whatever the
// guard said: query rows cu_q[b] <= cu_q[b+1] within [0, num_tokens], packed key rows
// cu_k[b] <= cu_k[b+1] within [0, kv_rows], and no more keys than the block table maps
// (max_blocks * block_size), so the main loop's q/k/v/out/table reads stay in bounds.
// Uniform over the block: it returns before the first barrier.
__device__ __forceinline__ bool sequence_runs(const int* fault, const int* cu_q, const int* cu_k,
                                              int max_blocks, int block_size,
                                              long long num_tokens, long long kv_rows) {
  const int b = blockIdx.z;
  if (guard::batch_faulted(fault, gridDim.z) || guard::sequence_faulted(fault, b)) return false;
  const long long q0 = cu_q[b], q1 = cu_q[b + 1], k0 = cu_k[b], k1 = cu_k[b + 1];
  return 0 <= q0 && q0 <= q1 && q1 <= num_tokens && 0 <= k0 && k0 <= k1 && k1 <= kv_rows &&
         k1 - k0 <= static_cast<long long>(max_blocks) * block_size;
}

}  // namespace mea
}  // namespace cupy_paged

// CUPY_PAGED_MEA_ENTRY(NAME, SCALAR, ARCH, QUERIES, KEYS, MAX_K) instantiates
// PagedFmha<AttentionKernel<SCALAR, cutlass::arch::ARCH, aligned, QUERIES, KEYS, MAX_K,
// no dropout, no bias>> and defines
//   extern "C" __device__ int NAME_launch_info[2] = {dynamic smem bytes, threads per block}
//     (read once per device with RawModule.get_global; blocks are (32, threads / 32, 1))
//   extern "C" __global__ void NAME(q, q_row_stride, k_packed, v_packed, out, out_accum, cu_q,
//     cu_k, block_table, fault, max_blocks, block_size, num_heads, kv_num_heads, head_size,
//     scale, softcap, window, num_tokens, kv_rows)  on grid (ceil(max_seqlen_q / QUERIES),
//     num_heads, batch); fault may be nullptr, num_tokens / kv_rows are the rows of q and out /
//     of k_packed and v_packed.
// "aligned" needs every row start 16-byte aligned: H % 8 == 0 and 16-byte aligned bases.
#define CUPY_PAGED_MEA_ENTRY(NAME, SCALAR, ARCH, QUERIES, KEYS, MAX_K)                          \
  using NAME##_fmha = cupy_paged::mea::PagedFmha<                                              \
      AttentionKernel<SCALAR, cutlass::arch::ARCH, true, QUERIES, KEYS, MAX_K, false, false>>; \
  extern "C" __device__ int NAME##_launch_info[2] = {NAME##_fmha::kSmemBytes,                  \
                                                     NAME##_fmha::kThreads};                   \
  extern "C" __global__ void __launch_bounds__(NAME##_fmha::kThreads,                          \
                                               NAME##_fmha::kMinBlocksPerSm)                   \
      NAME(const SCALAR* q, long long q_row_stride, const SCALAR* k_packed,                    \
           const SCALAR* v_packed, SCALAR* out, float* out_accum, const int* cu_q,             \
           const int* cu_k, const int* block_table, const int* fault, int max_blocks,          \
           int block_size, int num_heads, int kv_num_heads, int head_size, float scale,        \
           float softcap, int window, long long num_tokens, long long kv_rows) {               \
    if (!cupy_paged::mea::sequence_runs(fault, cu_q, cu_k, max_blocks, block_size,             \
                                        num_tokens, kv_rows)) {                                \
      return;                                                                                  \
    }                                                                                          \
    NAME##_fmha::run({q, q_row_stride, k_packed, v_packed, out, out_accum, cu_q, cu_k,         \
                      block_table, max_blocks, block_size, num_heads, kv_num_heads,            \
                      head_size, scale, softcap, window});                                     \
  }
