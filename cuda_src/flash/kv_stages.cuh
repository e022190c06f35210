// The ring of STAGES K/V tiles in shared memory that the flash key loop walks, and the
// STAGES + 1 slots of key offsets beside it (RingPos).
#pragma once
#include "flash/cta_tile.cuh"
#include "flash/paged_tiles.cuh"
#include "flash/traits.cuh"

namespace cupy_paged {
namespace flash {

// This CTA's keys and values: its sequence's block-table row, the caches at its kv head.
template <class Tr>
__device__ __forceinline__ KeyView<Tr> key_view(const FwdParams& p, const CtaTile& t) {
  using T = typename Tr::T;
  const long long head = static_cast<long long>(t.kvh) * t.head_size;
  return {static_cast<const T*>(p.key_cache) + head, static_cast<const T*>(p.value_cache) + head,
          p.block_table + static_cast<long long>(t.b) * p.max_blocks, p.num_blocks,
          p.max_blocks, p.kv_heads * t.head_size,
          BlockDiv{p.block_size, p.block_shift, p.block_magic, p.block_magic_shift}};
}

// The key rows of tile kt + STAGES, looked up while tile kt is computed (valid: it exists).
template <class Tr>
struct LookAhead {
  KeyRowOffsets<Tr> rows;
  bool valid;
};

// Where tile lo + i lives: its K/V in stage i % STAGES, its key side data (Layout::offsets: row
// r's byte offset in the cache, negative when the key is not loadable) in slot i % (STAGES + 1).
// One slot more than the stages because a tile's offsets are read twice: by the copies of the
// tile (issued STAGES - 1 iterations ahead) and by the unloadable-key mask when it is computed,
// while the look-ahead of tile kt + STAGES is stored during iteration kt. With STAGES + 1 slots
// that store lands in tile kt - 1's slot, which every warp left before iteration kt's barrier;
// with STAGES it would overwrite tile kt's offsets under a slower warp's mask.
template <int STAGES>
struct RingPos {
  int stage, slot;  // of tile kt
  __device__ __forceinline__ static RingPos first() { return {0, 0}; }
  __device__ __forceinline__ void advance() {
    stage = stage + 1 == STAGES ? 0 : stage + 1;
    slot = slot == STAGES ? 0 : slot + 1;
  }
  // The stage / slot of tile kt + STAGES - 1, and the slot of tile kt + STAGES.
  __device__ __forceinline__ int stage_behind() const {
    return stage == 0 ? STAGES - 1 : stage - 1;
  }
  __device__ __forceinline__ int slot_ahead(int n) const {  // slot of tile kt + n, n <= STAGES
    return slot + n > STAGES ? slot + n - (STAGES + 1) : slot + n;
  }
};

// The ring of K/V stages in shared memory that the flash key loop walks: tile kt is computed
// from its stage while tiles up to kt + STAGES - 1 are in flight (cp.async), and the key rows
// of tile kt + STAGES are resolved through the block table meanwhile. Iteration kt issues the
// copies of tile kt + STAGES - 1 from its offsets and stores tile kt + STAGES's. The loop's own
// state stays with the caller (locals promote to registers best): the RingPos of tile kt, and
// hole_bits, whose bit s says this thread saw an unloadable key in the tile of stage s.
template <class Tr>
struct KvStages {
  using L = typename Tr::Layout;
  using Pos = RingPos<Tr::STAGES>;
  static constexpr unsigned KV_BYTES = Tr::KV_BYTES;
  KeyView<Tr> kv;
  int kv_len, head_size;
  int lo, hi;  // the split's key tiles
  unsigned char *sK, *sV, *side;
  unsigned k_addr, v_addr;

  __device__ __forceinline__ KvStages(const FwdParams& p, const CtaTile& t,
                                      const FwdSmem<Tr>& sm)
      : kv(key_view<Tr>(p, t)),
        kv_len(t.kv_len),
        head_size(t.head_size),
        lo(t.my_lo),
        hi(t.my_hi),
        sK(sm.k),
        sV(sm.v),
        side(sm.side),
        k_addr(sm.k_addr),
        v_addr(sm.v_addr) {}

  // The key offsets of side slot s.
  __device__ __forceinline__ SideColumn<long long> offsets(int s) const {
    return L::offsets(sK, sV, side, s);
  }

  // The offsets of tiles lo .. lo + STAGES - 1 (block-table reads only: the caller may still
  // be before its wait for the prologue kernel); a barrier must follow.
  __device__ __forceinline__ void look_up_first(int tid) const {
#pragma unroll
    for (int s = 0; s < Tr::STAGES; ++s) {
      const int t = lo + s;
      if (t < hi) {
        KeyRowOffsets<Tr> rows;
        rows.look_up(kv, kv_len, t * Tr::BN, tid);
        rows.store(kv, offsets(s), tid);
      }
    }
  }
  // The copies of the first STAGES - 1 tiles, one commit group per tile.
  __device__ __forceinline__ void load_first(unsigned& hole_bits, int tid) const {
#pragma unroll
    for (int s = 0; s < Tr::STAGES - 1; ++s) {
      const int t = lo + s;
      if (t < hi) {
        const bool h = load_kv_tile<Tr>(k_addr + s * KV_BYTES, v_addr + s * KV_BYTES,
                                        offsets(s), kv, head_size, tid);
        hole_bits |= static_cast<unsigned>(h) << s;
      }
      cp_async_commit();
    }
  }

  // Before computing tile kt (at pos): its K/V have landed for every thread, and tile
  // kt + STAGES - 1's copies are issued into the stage every warp is done with. Returns whether
  // tile kt has an unloadable key (CTA-wide).
  __device__ __forceinline__ bool begin_tile(int kt, const Pos& pos, unsigned& hole_bits,
                                            LookAhead<Tr>& ahead, int tid) const {
    // Tile kt + STAGES's block-table loads go out first: they need no shared memory, and their
    // latency then overlaps the wait below as well as this tile's MMAs (a decode tile has few).
    const int far = kt + Tr::STAGES;
    ahead.valid = far < hi;
    if (ahead.valid) ahead.rows.look_up(kv, kv_len, far * Tr::BN, tid);
    cp_async_wait<Tr::STAGES - 2>();  // tile kt has landed (for this thread) ...
    // ... for every thread; every warp is done with the stage refilled below; and tile
    // kt + STAGES - 1's offsets are visible.
    const bool hole = __syncthreads_or((hole_bits >> pos.stage) & 1u) != 0;
    const int next = kt + Tr::STAGES - 1;
    const int ns = pos.stage_behind();
    if (next < hi) {
      const bool h = load_kv_tile<Tr>(k_addr + ns * KV_BYTES, v_addr + ns * KV_BYTES,
                                      offsets(pos.slot_ahead(Tr::STAGES - 1)), kv, head_size,
                                      tid);
      hole_bits = (hole_bits & ~(1u << ns)) | (static_cast<unsigned>(h) << ns);
    }
    cp_async_commit();
    return hole;
  }

  // While computing tile kt: tile kt + STAGES's offsets go to their slot (tile kt - 1's, free
  // since this iteration's barrier; the next iteration's barrier publishes them).
  __device__ __forceinline__ void end_tile(const Pos& pos, const LookAhead<Tr>& ahead,
                                           int tid) const {
    if (ahead.valid) ahead.rows.store(kv, offsets(pos.slot_ahead(Tr::STAGES)), tid);
  }
};

}  // namespace flash
}  // namespace cupy_paged
