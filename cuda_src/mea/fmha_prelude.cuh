// NVRTC prelude for upstream CUTLASS fMHA: includes examples/41's kernel_forward.h from the
// installed nvidia-cutlass package (never a copy) after supplying the few std names and the
// execution-space fix that header needs under NVRTC. Std headers it includes come from nvrtc_shim/.
#pragma once
#include <cuda/std/cmath>
#include <cuda/std/cstddef>
#include <cuda/std/type_traits>

// kernel_forward.h and its helpers spell these std:: (NVRTC has no libstdc++): size_t in
// debug_utils.h, true_type/false_type in DISPATCH_BOOL, sqrt in cutlass/functional.h below sm_53.
namespace std {
using cuda::std::false_type;
using cuda::std::size_t;
using cuda::std::sqrt;
using cuda::std::true_type;
}  // namespace std

// NVRTC rejects host-only functions ("not allowed in JIT mode"); kernel_forward.h has three
// (Params::getBlocksGrid/getThreadsGrid, check_supported) that only a host launcher calls.
// Blank __host__ while it is parsed so they become device functions under -default-device;
// NVRTC 12.9 ignores #pragma push_macro, so restore crt/host_defines.h's definition by hand.
#undef __host__
#define __host__
#include "kernel_forward.h"
#undef __host__
#define __host__ __location__(host)
