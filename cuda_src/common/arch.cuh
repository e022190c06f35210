// What each SM generation offers the kernels (CUDA C++ Programming Guide, technical
// specifications per compute capability). kTable is the one description: the host side
// (cupy_paged/backends) parses the same lines for its shared-memory numbers, so every entry
// keeps exactly this one-line form:
//   {sm, smem_per_block, smem_per_sm, cp_async, mma_m, mma_n, mma_k},  // smNN
// sm: compute capability major * 10 + minor; smem_per_block: the opt-in maximum of dynamic
// shared memory per block (bytes); smem_per_sm: shared memory per SM (bytes); cp_async: true if
// the SM has cp.async (global -> shared without registers); mma_m/n/k: the fp16 mma.sync shape
// with fp32 accumulators (0, 0, 0: none).
#pragma once

namespace cupy_paged {
namespace arch {

struct Info {
  int sm;              // 0: not in the table
  int smem_per_block;
  int smem_per_sm;
  bool cp_async;
  int mma_m, mma_n, mma_k;
};

constexpr Info kTable[] = {
    {50, 49152, 65536, false, 0, 0, 0},       // sm50
    {52, 49152, 98304, false, 0, 0, 0},       // sm52
    {60, 49152, 65536, false, 0, 0, 0},       // sm60
    {61, 49152, 98304, false, 0, 0, 0},       // sm61
    {70, 98304, 98304, false, 8, 8, 4},       // sm70
    {75, 65536, 65536, false, 16, 8, 8},      // sm75
    {80, 166912, 167936, true, 16, 8, 16},    // sm80
    {86, 101376, 102400, true, 16, 8, 16},    // sm86
    {87, 166912, 167936, true, 16, 8, 16},    // sm87
    {89, 101376, 102400, true, 16, 8, 16},    // sm89
    {90, 232448, 233472, true, 16, 8, 16},    // sm90
    {100, 232448, 233472, true, 16, 8, 16},   // sm100
    {103, 232448, 233472, true, 16, 8, 16},   // sm103
    {120, 101376, 102400, true, 16, 8, 16},   // sm120
    {121, 101376, 102400, true, 16, 8, 16},   // sm121
};

// The entry of compute capability sm (exactly), or Info{} (sm = 0) when the table has none.
// Compile-time use only (template arguments, static_assert, constexpr constants).
__host__ __device__ constexpr Info info(int sm) {
  for (const Info& e : kTable)
    if (e.sm == sm) return e;
  return Info{0, 0, 0, false, 0, 0, 0};
}

}  // namespace arch
}  // namespace cupy_paged
