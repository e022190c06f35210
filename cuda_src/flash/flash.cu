// The flash backend's kernels: paged-KV FlashAttention-2 forward (fwd_kernel.cuh) and the
// split-KV combine (combine.cuh). cupy_paged/backends/_flash_kernels.py generates one
// extern "C" entry per instantiation after these includes.
#include "flash/combine.cuh"
#include "flash/fwd_kernel.cuh"
