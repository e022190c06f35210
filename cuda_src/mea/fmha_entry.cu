// Entry points of the paged fMHA ("mea" backend). cupy_paged/backends/_mea_kernels.py generates
// one extern "C" entry per instantiation after this file, taking mea/params.cuh's FmhaParams by
// value and calling paged_fmha, and its launch facts as a readable global.
// "aligned" (every instantiation): every row start 16-byte aligned, H % 8 == 0 and 16-byte
// aligned bases.
#include "guard/fault_codes.cuh"
#include "mea/fmha_paged.cuh"
#include "mea/params.cuh"

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

// The body of every entry (cupy_paged/backends/_mea_kernels.py generates them): Fmha is a
// PagedFmha<AttentionKernel<...>> instantiation, launched on grid (ceil(max_seqlen_q / kQ),
// num_heads, batch) with blocks of (32, kThreads / 32, 1) and kSmemBytes of dynamic shared
// memory, which the entry's NAME_launch_info global holds for the host.
template <class Fmha>
__device__ __forceinline__ void paged_fmha(const FmhaParams& p) {
  using S = typename Fmha::scalar_t;
  if (!sequence_runs(p.fault, p.cu_q, p.cu_k, p.max_blocks, p.block_size, p.num_tokens,
                     p.kv_rows)) {
    return;
  }
  Fmha::run({static_cast<const S*>(p.q), p.q_row_stride, static_cast<const S*>(p.k_packed),
             static_cast<const S*>(p.v_packed), static_cast<S*>(p.out), p.out_accum, p.cu_q,
             p.cu_k, p.block_table, p.max_blocks, p.block_size, p.num_heads, p.kv_num_heads,
             p.head_size, p.scale, p.softcap, p.window});
}

}  // namespace mea
}  // namespace cupy_paged
