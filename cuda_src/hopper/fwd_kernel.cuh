// The sm90a flash forward kernel: one CTA per (128-row query tile of one sequence, kv head),
// warp-specialised. Warpgroup 0 produces (hopper/producer.cuh: Q, then the K/V tiles through
// the block table into a shared-memory ring), warpgroups 1 and 2 consume 64 rows each with
// warpgroup MMAs (hopper/consumer.cuh); registers move from the producer to the consumers
// (setmaxnreg). Which rows and keys a CTA covers is flash/cta_tile.cuh's locate_tile, the same
// as the sm80 kernel's (G query heads of a kv head packed into the rows, row = token * G + g).
// One split only: split-KV runs the sm80 kernel (cupy_paged/backends/_flash_policy.py). The
// rings' positions and the Q tile's uses live in the roles (Producer, Consumer) and carry from
// one work unit to the next.
#pragma once
#include "common/pdl.cuh"
#include "flash/cta_tile.cuh"
#include "flash/params.cuh"
#include "hopper/consumer.cuh"
#include "hopper/producer.cuh"
#include "hopper/smem.cuh"
#include "hopper/sync.cuh"
#include "hopper/traits.cuh"

namespace cupy_paged {
namespace hopper {

template <class Tr>
__device__ __forceinline__ void fwd90(const flash::FwdParams& p) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const Smem90<Tr> sm(smem_raw);
  if (threadIdx.x == 0) {
    if (sm.base_addr & 1023) __trap();  // the swizzled tiles need 1024-byte atoms
    sm.init_barriers();
  }
  __syncthreads();
  pdl::wait();  // q (rotated) and the new keys and values are the prologue kernel's
  pdl::launch_dependents();
  if (threadIdx.x < Tr::PRODUCER_THREADS) {
    regs_down<Tr::PRODUCER_REGS>();
    Producer<Tr> producer(p, sm, threadIdx.x);
    if constexpr (Tr::PERSISTENT) {
      producer.run_all(p);
    } else {
      flash::CtaTile t;
      if (flash::locate_tile<Tr>(p, threadIdx.x, t)) producer.run(p, t);
    }
    flash::cp_async_wait<0>();  // nothing in flight when the thread exits
  } else {
    regs_up<Tr::CONSUMER_REGS>();
    Consumer<Tr> consumer(p, sm, threadIdx.x - Tr::PRODUCER_THREADS);
    if constexpr (Tr::PERSISTENT) {
      consumer.run_all(p);
    } else {
      flash::CtaTile t;
      if (flash::locate_tile<Tr>(p, threadIdx.x, t)) consumer.run(p, t);
    }
  }
}

}  // namespace hopper
}  // namespace cupy_paged
