// Warpgroup MMA (sm90a): the shared-memory matrix descriptors of 128-byte swizzled tiles, and
// the fences and groups that order the asynchronous MMAs (PTX ISA, "Asynchronous Warpgroup
// Level Matrix Multiply-Accumulate"). The MMAs themselves: hopper/wgmma_ops.cuh (generated).
//
// Accumulators: a warpgroup's 64 x N fp32 tile, per thread d[N / 8][4], warp w of the group
// holding rows 16 w .. 16 w + 15 exactly as an m16n8 mma.sync C fragment repeated over N:
// d[n][e] is row 16 w + lane / 4 + 8 (e / 2), column 8 n + 2 (lane % 4) + e % 2. Register A
// (16-bit): the m16n8k16 A fragment of the warp's 16 rows.
#pragma once
#include "hopper/wgmma_ops.cuh"

namespace cupy_paged {
namespace wgmma {

// A matrix in shared memory as 128-byte swizzled "panels" (hopper/swizzle_tile.cuh): rows of
// 64 16-bit elements (128 bytes), 8-row atoms of 1024 bytes, atom-aligned. Descriptor bits:
// start address >> 4 in [0, 14), leading byte offset >> 4 in [16, 30), stride byte offset >> 4
// in [32, 46), base offset [49, 52) = 0 (atoms are 1024-byte aligned), swizzle [62, 64) = 1
// (128 bytes).
__device__ __forceinline__ unsigned long long descriptor(unsigned addr, unsigned lead_bytes,
                                                         unsigned stride_bytes) {
  return static_cast<unsigned long long>((addr & 0x3FFFF) >> 4) |
         (static_cast<unsigned long long>(lead_bytes >> 4) << 16) |
         (static_cast<unsigned long long>(stride_bytes >> 4) << 32) | (1ull << 62);
}

// K-major operand (rows of K-contiguous elements: Q and K tiles): 16 channels of the rows
// starting at `addr` (which selects the panel and the 32-byte column step inside it); rows
// advance 1024 bytes per 8-row atom. The leading offset is unused for swizzled K-major.
__device__ __forceinline__ unsigned long long k_major(unsigned addr) {
  return descriptor(addr, 16, 1024);
}

// MN-major operand (V as B of P V: key rows of channel-contiguous elements): 16 key rows from
// `addr`; the next 8 keys are 1024 bytes on (stride), the next 64 channels one panel on
// (leading: panel_bytes).
__device__ __forceinline__ unsigned long long mn_major(unsigned addr, unsigned panel_bytes) {
  return descriptor(addr, panel_bytes, 1024);
}

// Before a warpgroup's first MMA that reads registers or accumulators written by ordinary
// instructions (and shared memory the group wrote; see proxy_fence).
__device__ __forceinline__ void fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Until at most N committed groups of this warpgroup are in flight.
template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}

// Pins accumulator registers at this point of the program: the compiler may not move their
// reads or writes across it (an MMA in flight owns them until its wait).
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[n][e])::"memory");
}

}  // namespace wgmma
}  // namespace cupy_paged
