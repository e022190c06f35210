// A CTA's dynamic shared memory in the sm90a kernel (hopper/traits.cuh gives the offsets):
// the Q tile (reused to stage the output), the K and V rings, each stage's key offsets and
// hole flag, and the mbarriers: q_full (the Q copies landed), full[s] (stage s holds its next
// tile: the producer's copies landed and its offsets and flag are published) and empty[s]
// (every consumer warp is done with stage s).
#pragma once
#include "flash/mma.cuh"
#include "hopper/sync.cuh"

namespace cupy_paged {
namespace hopper {

template <class Tr>
struct Smem90 {
  unsigned char* base;
  unsigned base_addr, q_addr, q_full;

  __device__ __forceinline__ explicit Smem90(unsigned char* b)
      : base(b),
        base_addr(flash::smem_addr(b)),
        q_addr(base_addr),
        q_full(base_addr + Tr::BARS_OFF) {}

  __device__ __forceinline__ unsigned k_addr(int s) const {
    return base_addr + Tr::K_OFF + s * Tr::KV_BYTES;
  }
  __device__ __forceinline__ unsigned v_addr(int s) const {
    return base_addr + Tr::V_OFF + s * Tr::KV_BYTES;
  }
  // K stage s's key rows: key r's row in the cache (block * block_size + slot: < 2^31, the
  // policy's condition), or -1 when the key is not loadable (the masks read the sign).
  __device__ __forceinline__ int* key_rows(int s) const {
    return reinterpret_cast<int*>(base + Tr::OFFSETS_OFF + s * Tr::OFFSETS_BYTES);
  }
  __device__ __forceinline__ int* holes() const {
    return reinterpret_cast<int*>(base + Tr::HOLES_OFF);
  }
  __device__ __forceinline__ unsigned bar(int i) const {
    return base_addr + Tr::BARS_OFF + 8 * i;
  }
  __device__ __forceinline__ unsigned k_full(int s) const { return bar(1 + s); }
  __device__ __forceinline__ unsigned v_full(int s) const { return bar(1 + Tr::STAGES + s); }
  __device__ __forceinline__ unsigned k_empty(int s) const { return bar(1 + 2 * Tr::STAGES + s); }
  __device__ __forceinline__ unsigned v_empty(int s) const { return bar(1 + 3 * Tr::STAGES + s); }

  // Thread 0, before the CTA's first barrier: every mbarrier with its expected arrivals.
  __device__ __forceinline__ void init_barriers() const {
    mbar_init(q_full, Tr::PRODUCER_THREADS);  // one cp.async arrival per producer thread
    for (int s = 0; s < Tr::STAGES; ++s) {
      // + one publishing arrival per key row (each writer releases its own row: compute-sanitizer's
      // racecheck does not carry a named barrier's ordering through another thread's arrival)
      mbar_init(k_full(s), Tr::PRODUCER_THREADS + Tr::BN);
      mbar_init(v_full(s), Tr::PRODUCER_THREADS);
      mbar_init(k_empty(s), Tr::WARPS);                // one per consumer warp
      mbar_init(v_empty(s), Tr::WARPS);
    }
  }
};

}  // namespace hopper
}  // namespace cupy_paged
