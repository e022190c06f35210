// Warp-level building blocks of the flash kernel (sm80+): 16-byte cp.async with zero-fill,
// ldmatrix (plain and transposed), mma.sync m16n8k16 with fp32 accumulators in fp16 or bf16.
// The fp32 -> 16-bit pair packing that turns accumulators into A fragments is common/dtypes.cuh's
// pack2.
#pragma once
#include "common/dtypes.cuh"

namespace cupy_paged {
namespace flash {

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared through L2 only (.cg: K/V are streamed once per CTA). valid = false
// writes 16 zero bytes and reads nothing (src-size 0), so masked rows are finite zeros.
__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Wait until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}

// Four 8x8 b16 matrices; lane i gives the row address of matrix i / 8, row i % 8. Register j
// of lane l holds row l / 4, columns 2 (l % 4) + {0, 1} of matrix j (transposed: column l / 4,
// rows 2 (l % 4) + {0, 1}).
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// d (16x8 fp32) += a (16x16, row-major) * b (16x8, column-major); T: __half or __nv_bfloat16
// (one PTX string, its input type spliced in).
#define CUPY_PAGED_MMA_16816(AB)                                                                \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." AB "." AB                              \
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"        \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                          unsigned b1) {
  static_assert(sizeof(T) == 2, "fp16 / bf16 inputs");
  if constexpr (IsBf16<T>::value) {
    CUPY_PAGED_MMA_16816("bf16");
  } else {
    CUPY_PAGED_MMA_16816("f16");
  }
}
#undef CUPY_PAGED_MMA_16816

}  // namespace flash
}  // namespace cupy_paged
