// Smoke kernel for the NVRTC toolchain: y[i] = a * x[i] + y[i] for i < n, x and y of shape (n,).
// Templated on the element type; cupy_paged.jit.registry generates one extern "C" entry per
// dtype (smoke_axpy_f16, smoke_axpy_f32), so a cubin that loads and adds proves the whole chain.
#include <cuda_fp16.h>

namespace cupy_paged {
namespace smoke {

template <typename T>
__device__ __forceinline__ void axpy(int n, float a, const T* __restrict__ x, T* __restrict__ y) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    y[i] = T(a * static_cast<float>(x[i]) + static_cast<float>(y[i]));  // fp32 math for fp16 too
  }
}

}  // namespace smoke
}  // namespace cupy_paged
