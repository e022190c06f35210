// Synchronisation of the warp-specialised sm90 kernel: mbarriers in shared memory (the K/V
// ring's full / empty handshakes), named barriers for one warpgroup, the proxy fence between
// ordinary shared-memory writes and the tensor cores' reads, and register reallocation
// between warpgroups (PTX ISA: mbarrier, bar, fence.proxy.async, setmaxnreg).
#pragma once

namespace cupy_paged {
namespace hopper {

__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}

// An ordinary arrival (release: this thread's earlier writes are visible to a waiter).
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}

// An arrival made when every cp.async this thread issued so far has landed (it counts
// against the barrier's expected arrivals: .noinc).
__device__ __forceinline__ void mbar_arrive_on_copies(unsigned bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" :: "r"(bar)
               : "memory");
}

// The calling warp is done reading what an "empty" barrier guards: one arrival per warp
// (lane 0's, after every lane's reads).
__device__ __forceinline__ void release(unsigned empty_bar, int lane) {
  __syncwarp();
  if (lane == 0) mbar_arrive(empty_bar);
}

// Blocks until the barrier's phase of parity `parity` has completed (acquire).
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
  unsigned done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  }
}

// Named barrier `id` (1..15; 0 is __syncthreads) among `threads` threads (whole warps).
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}
// The same, returning whether any participant passed pred.
__device__ __forceinline__ bool named_sync_or(int id, int threads, bool pred) {
  unsigned any;
  asm volatile(
      "{\n.reg .pred p, q;\n"
      "setp.ne.u32 p, %1, 0;\n"
      "bar.red.or.pred q, %2, %3, p;\n"
      "selp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(any) : "r"(static_cast<unsigned>(pred)), "r"(id), "r"(threads) : "memory");
  return any != 0;
}

// Orders this thread's earlier generic-proxy shared-memory writes (stores, landed cp.async)
// before later async-proxy accesses (wgmma operand reads) of the CTA.
__device__ __forceinline__ void proxy_fence() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Register reallocation: a warpgroup gives registers back (dec) or takes them (inc); every
// warp of the group executes it. Needs a register cap at entry (__launch_bounds__(t, 1)).
template <int REGS>
__device__ __forceinline__ void regs_down() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(REGS));
}
template <int REGS>
__device__ __forceinline__ void regs_up() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(REGS));
}

}  // namespace hopper
}  // namespace cupy_paged
