// A CTA's dynamic shared memory in the sm90a kernel (hopper/traits.cuh gives the offsets):
// the Q tile (reused to stage the output unless the tile has an output tile of its own), the K
// and V rings, each stage's key offsets and hole flag, a persistent CTA's two work-unit slots,
// and the mbarriers: q_full (the Q copies landed), q_empty (the consumers are done with Q),
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
  unsigned base_addr, q_addr, q_full, q_empty;

  __device__ __forceinline__ explicit Smem90(unsigned char* b)
      : base(b),
        base_addr(flash::smem_addr(b)),
        q_addr(base_addr),
        q_full(base_addr + Tr::BARS_OFF),
        q_empty(base_addr + Tr::BARS_OFF + 8) {}

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
  __device__ __forceinline__ unsigned k_full(int s) const { return bar(2 + s); }
  __device__ __forceinline__ unsigned v_full(int s) const { return bar(2 + Tr::STAGES + s); }
  __device__ __forceinline__ unsigned k_empty(int s) const { return bar(2 + 2 * Tr::STAGES + s); }
  __device__ __forceinline__ unsigned v_empty(int s) const { return bar(2 + 3 * Tr::STAGES + s); }
  __device__ __forceinline__ unsigned unit_full(int i) const { return bar(2 + 4 * Tr::STAGES + i); }
  __device__ __forceinline__ unsigned unit_empty(int i) const {
    return bar(4 + 4 * Tr::STAGES + i);
  }
  __device__ __forceinline__ UnitSlot* unit(int i) const {
    return reinterpret_cast<UnitSlot*>(base + Tr::UNITS_OFF + i * Tr::UNIT_SLOT_BYTES);
  }
  // Where the output rows are staged: the Q tile, or (O_SEPARATE) a tile of their own.
  __device__ __forceinline__ unsigned char* out_tile() const {
    return base + (Tr::O_SEPARATE ? Tr::O_OFF : 0);
  }

  // Thread 0, before the CTA's first barrier: every mbarrier with its expected arrivals.
  __device__ __forceinline__ void init_barriers() const {
    mbar_init(q_full, Tr::PRODUCER_THREADS);  // one cp.async arrival per producer thread
    mbar_init(q_empty, Tr::WARPS);             // one per consumer warp
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
