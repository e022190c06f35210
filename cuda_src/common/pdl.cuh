// Programmatic dependent launch (PDL, sm90+): a kernel launched with the programmatic stream
// serialization attribute (cupy_paged/backends/_launch.py, DirectLaunch(programmatic=True)) may
// start while the kernel before it on the stream is still running, once every CTA of that kernel
// has called launch_dependents() or exited; wait() then blocks until that kernel has completed
// and its writes are visible (PTX ISA, griddepcontrol).
//
// The rules this project keeps: a programmatic kernel reads nothing its predecessor writes
// before wait(), and every one of its CTAs calls wait() before it exits, so a kernel completes
// only after its predecessor has (stream order holds across the whole chain). Before sm90, and
// for kernels launched without the attribute, both are no-ops.
#pragma once

namespace cupy_paged {
namespace pdl {

// Blocks until the preceding kernel on the stream has completed and its writes are visible.
__device__ __forceinline__ void wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Lets the next kernel on the stream (if launched programmatically) start once every CTA of
// this one has called this or exited.
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

}  // namespace pdl
}  // namespace cupy_paged
