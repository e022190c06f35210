// A CTA's dynamic shared memory in the sm90a kernel (hopper/traits.cuh gives the offsets):
// the Q tile or tiles (each reused to stage its unit's output), the K and V rings, each stage's
// key offsets and hole flag, a persistent CTA's two work-unit slots, and the mbarriers:
// q_full[b] (Q tile b's copies landed), q_empty[b] (the consumers are done with Q tile b),
// full[s] (stage s holds its next tile: the producer's copies landed and its offsets and flag
// are published), empty[s] (every consumer warp, for K every consumer thread, is done with
// stage s), unit_full[i] / unit_empty[i] (slot i published / read).
#pragma once
#include "flash/cta_tile.cuh"
#include "flash/mma.cuh"
#include "hopper/sync.cuh"

namespace cupy_paged {
namespace hopper {

// A persistent CTA's next work unit as the producer's thread 0 publishes it (hopper/
// fwd_kernel.cuh): state 1 = compute t, 0 = nothing to compute, -1 = no unit left.
struct UnitSlot {
  int state;
  flash::CtaTile t;
};
static_assert(sizeof(UnitSlot) <= 64, "Traits90::UNIT_SLOT_BYTES");

template <class Tr>
struct Smem90 {
  unsigned char* base;
  unsigned base_addr;

  __device__ __forceinline__ explicit Smem90(unsigned char* b)
      : base(b),
        base_addr(flash::smem_addr(b)) {}

  __device__ __forceinline__ unsigned q_addr(int b) const { return base_addr + b * Tr::Q_BYTES; }
  __device__ __forceinline__ unsigned char* q_tile(int b) const { return base + b * Tr::Q_BYTES; }

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
  static constexpr int RING_BAR = 2 * Tr::Q_BUFS;  // the first K/V ring barrier
  __device__ __forceinline__ unsigned q_full(int b) const { return bar(b); }
  __device__ __forceinline__ unsigned q_empty(int b) const { return bar(Tr::Q_BUFS + b); }
  __device__ __forceinline__ unsigned k_full(int s) const { return bar(RING_BAR + s); }
  __device__ __forceinline__ unsigned v_full(int s) const {
    return bar(RING_BAR + Tr::STAGES + s);
  }
  __device__ __forceinline__ unsigned k_empty(int s) const {
    return bar(RING_BAR + 2 * Tr::STAGES + s);
  }
  __device__ __forceinline__ unsigned v_empty(int s) const {
    return bar(RING_BAR + 3 * Tr::STAGES + s);
  }
  __device__ __forceinline__ unsigned unit_full(int i) const {
    return bar(RING_BAR + 4 * Tr::STAGES + i);
  }
  __device__ __forceinline__ unsigned unit_empty(int i) const {
    return bar(RING_BAR + 4 * Tr::STAGES + 2 + i);
  }
  __device__ __forceinline__ UnitSlot* unit(int i) const {
    return reinterpret_cast<UnitSlot*>(base + Tr::UNITS_OFF + i * Tr::UNIT_SLOT_BYTES);
  }

  // Thread 0, before the CTA's first barrier: every mbarrier with its expected arrivals.
  __device__ __forceinline__ void init_barriers() const {
    for (int b = 0; b < Tr::Q_BUFS; ++b) {
      mbar_init(q_full(b), Tr::PRODUCER_THREADS);  // one cp.async arrival per producer thread
      mbar_init(q_empty(b), Tr::WARPS);            // one per consumer warp
    }
    for (int s = 0; s < Tr::STAGES; ++s) {
      // + one publishing arrival per key row (each writer releases its own row: compute-sanitizer's
      // racecheck does not carry a named barrier's ordering through another thread's arrival)
      mbar_init(k_full(s), Tr::PRODUCER_THREADS + Tr::BN);
      mbar_init(v_full(s), Tr::PRODUCER_THREADS);
      mbar_init(k_empty(s), 32 * Tr::WARPS);           // one per consumer thread
      mbar_init(v_empty(s), Tr::WARPS);
    }
    if (Tr::PERSISTENT) {
      for (int i = 0; i < 2; ++i) {
        mbar_init(unit_full(i), 1);           // the producer's thread 0 published slot i
        mbar_init(unit_empty(i), Tr::THREADS / 32);  // every warp has read it
      }
    }
  }
};

}  // namespace hopper
}  // namespace cupy_paged
