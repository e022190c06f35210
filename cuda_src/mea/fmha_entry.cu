// Entry points of the paged fMHA ("mea" backend). cupy_paged/backends/_mea_kernels.py generates
// one CUPY_PAGED_MEA_ENTRY line per instantiation after this file; each defines a plain-argument
// extern "C" kernel (CuPy cannot pass structs) and its launch facts as a readable global.
#include "mea/fmha_paged.cuh"

// CUPY_PAGED_MEA_ENTRY(NAME, SCALAR, ARCH, QUERIES, KEYS, MAX_K) instantiates
// PagedFmha<AttentionKernel<SCALAR, cutlass::arch::ARCH, aligned, QUERIES, KEYS, MAX_K,
// no dropout, no bias>> and defines
//   extern "C" __device__ int NAME_launch_info[2] = {dynamic smem bytes, threads per block}
//     (read once per device with RawModule.get_global; blocks are (32, threads / 32, 1))
//   extern "C" __global__ void NAME(q, q_row_stride, k_packed, v_packed, out, out_accum, cu_q,
//     cu_k, block_table, max_blocks, block_size, num_heads, kv_num_heads, head_size, scale,
//     softcap, window)  on grid (ceil(max_seqlen_q / QUERIES), num_heads, batch).
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
           const int* cu_k, const int* block_table, int max_blocks, int block_size,            \
           int num_heads, int kv_num_heads, int head_size, float scale, float softcap,         \
           int window) {                                                                       \
    NAME##_fmha::run({q, q_row_stride, k_packed, v_packed, out, out_accum, cu_q, cu_k,         \
                      block_table, max_blocks, block_size, num_heads, kv_num_heads,            \
                      head_size, scale, softcap, window});                                     \
  }
