// CUTLASS fMHA probe: proves upstream AttentionKernel compiles and links under NVRTC.
// cupy_paged.jit.registry instantiates AttentionKernel per (dtype, ArchTag, tile) and generates
// an extern "C" __global__ entry whose body is fmha_forward_block below.
#include "mea/fmha_prelude.cuh"

namespace cupy_paged {
namespace mea {

// One thread block's work, as upstream's attention_kernel_batched_impl does it: the block finds
// its (batch, head, query tile) from blockIdx and returns when that tile is past the end.
template <typename AK>
__device__ __forceinline__ void fmha_forward_block(typename AK::Params& p) {
  if (!p.advance_to_block()) {
    return;
  }
  AK::attention_kernel(p);
}

}  // namespace mea
}  // namespace cupy_paged
