// Global -> shared tile loads of the flash kernel with cp.async: the Q tile of (token, head)
// rows, and K/V tiles read straight from the paged cache, each key row resolved through the
// block table one tile ahead (any block_size >= 1).
#pragma once
#include "common/paged_kv.cuh"
#include "flash/mma.cuh"
#include "flash/smem_layout.cuh"

namespace cupy_paged {
namespace flash {

// One sequence's keys and values for one kv head (common/paged_kv.cuh): block_table is the
// sequence's row, the caches start at the head's channel 0.
template <class Tr>
using KeyView = PagedKV<const typename Tr::T>;

// (token j, head g) = divmod(row, G) of the rows row, row + step, row + 2 step, ... that one
// thread visits, kept with adds instead of a division per row (two divisions in all).
struct RowWalk {
  int j, g, dj, dg, group;
  __device__ __forceinline__ RowWalk(int row, int step, int group_) : group(group_) {
    j = row / group;
    g = row - j * group;
    dj = step / group;
    dg = step - dj * group;
  }
  __device__ __forceinline__ void next() {
    j += dj;
    g += dg;
    if (g >= group) {
      g -= group;
      ++j;
    }
  }
};

// A (rows x HEAD) tile moved in 16-byte chunks: thread tid always takes chunk c = tid % CHUNKS
// of rows r_first + i * ROWS_PER_PASS, i < PASSES (threads past ROWS_PER_PASS * CHUNKS idle when
// CHUNKS does not divide THREADS), so its shared addresses are a base plus constants.
template <class Tr, int ROWS>
struct ChunkRows {
  static constexpr int ROWS_PER_PASS = Tr::THREADS / Tr::CHUNKS;
  static constexpr int PASSES = (ROWS + ROWS_PER_PASS - 1) / ROWS_PER_PASS;
  static_assert(ROWS_PER_PASS >= 1, "one row's chunks fit the CTA");
  int c, r_first;
  __device__ __forceinline__ explicit ChunkRows(int tid)
      : c(tid % Tr::CHUNKS), r_first(tid / Tr::CHUNKS) {}
  __device__ __forceinline__ bool active() const { return r_first < ROWS_PER_PASS; }
  __device__ __forceinline__ int row(int i) const { return r_first + i * ROWS_PER_PASS; }
  // pass i has a row (always, when ROWS_PER_PASS divides ROWS)
  __device__ __forceinline__ bool has(int i) const {
    return ROWS % ROWS_PER_PASS == 0 || row(i) < ROWS;
  }
};

// The Q tile: row r of the tile is sequence row row0 + r = (token j, head g) with j = row / G,
// g = row % G; rows past `rows` and channels >= H are zero-filled. q: (T, N*H).
template <class Tr>
__device__ __forceinline__ void load_q_tile(unsigned sQ, const typename Tr::T* q,
                                            long long q_begin, int row0, int rows, int group,
                                            int head0, int num_heads, int head_size, int tid) {
  using CR = ChunkRows<Tr, Tr::BM>;
  const CR cr(tid);
  if (!cr.active()) return;
  const bool chunk_ok = cr.c * 8 < head_size;
  using L = typename Tr::Layout;
  const unsigned dst = sQ + L::at(cr.r_first, cr.c);
  RowWalk w(row0 + cr.r_first, CR::ROWS_PER_PASS, group);
#pragma unroll
  for (int i = 0; i < CR::PASSES; ++i) {
    if (!cr.has(i)) break;
    const bool ok = row0 + cr.row(i) < rows && chunk_ok;
    const typename Tr::T* src =
        ok ? q + ((q_begin + w.j) * num_heads + head0 + w.g) * head_size + cr.c * 8 : q;
    cp_async_16(L::rows_on(dst, i * CR::ROWS_PER_PASS), src, ok);
    w.next();
  }
}

// A pad's offset for a key that is not loadable: negative, and 0 once the sign bit is cleared
// (so the masked copy's source address stays the row's base).
constexpr long long kNotLoadable = -0x7fffffffffffffffLL - 1;

// Key-row offsets, looked up one tile ahead of the copies that use them, so the block-table
// lookup's latency hides behind a tile of MMAs instead of stalling every thread before its
// cp.async (one lookup per key row, any block_size, instead of one per 16-byte chunk). Thread
// tid resolves rows tid + i * THREADS (i < PER_THREAD) of keys [k0, k0 + BN): look_up issues
// the block-table loads and keeps the raw entries in registers; store, a tile of MMAs later,
// turns them into byte offsets in the stage's offset column (Layout::offsets), 64-bit (caches
// past 2^31 elements are real), or kNotLoadable for a key outside [0, kv_len), past the
// table, or in an unmapped or out-of-range block.
template <class Tr>
struct KeyRowOffsets {
  static constexpr int PER_THREAD = (Tr::BN + Tr::THREADS - 1) / Tr::THREADS;
  int block[PER_THREAD];  // block_table entry, or -1 when the key is not loadable
  int slot[PER_THREAD];   // the key's slot in its block

  __device__ __forceinline__ void look_up(const KeyView<Tr>& kv, int kv_len, int k0, int tid) {
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
      const int r = tid + i * Tr::THREADS;
      const int pos = k0 + r;
      block[i] = -1;
      slot[i] = 0;
      if (r < Tr::BN && pos >= 0 && pos < kv_len) {
        const int column = kv.blocks.div(pos);
        if (column < kv.max_blocks) {
          block[i] = kv.block_table[column];
          slot[i] = pos - column * kv.blocks.size;
        }
      }
    }
  }
  __device__ __forceinline__ void store(const KeyView<Tr>& kv,
                                        const SideColumn<long long> pads, int tid) const {
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
      const int r = tid + i * Tr::THREADS;
      if (r < Tr::BN) {
        constexpr long long kBytes = sizeof(typename Tr::T);
        pads[r] = kv.mapped(block[i]) ? kv.offset(block[i], slot[i]) * kBytes : kNotLoadable;
      }
    }
  }
};

// Issues the K and V tile of keys [k0, k0 + BN) into the stages at shared addresses sK, sV from
// the row offsets in sOff (KeyRowOffsets, visible to every thread), zero-filling keys that are
// not loadable and channels >= H. Returns whether any key this thread touched is not loadable
// (the CTA-wide OR tells the consumer whether the tile needs masking beyond causal/window,
// which reads the offsets' signs).
//
// All of the thread's row offsets are read before its first copy (a copy is a memory clobber,
// so a read after it could not be hoisted and each would wait out its own latency); per row,
// then, two 64-bit adds and the two copies.
template <class Tr>
__device__ __forceinline__ bool load_kv_tile(unsigned sK, unsigned sV,
                                             const SideColumn<long long> sOff,
                                             const KeyView<Tr>& kv,
                                             int head_size, int tid) {
  using CR = ChunkRows<Tr, Tr::BN>;
  const CR cr(tid);
  if (!cr.active()) return false;
  const bool chunk_ok = cr.c * 8 < head_size;   // channels >= H: zero-filled
  long long off[CR::PASSES];  // bytes; kNotLoadable: not loadable
#pragma unroll
  for (int i = 0; i < CR::PASSES; ++i) off[i] = cr.has(i) ? sOff[cr.row(i)] : 0;
  const char* k_src = reinterpret_cast<const char*>(kv.key_cache) + cr.c * 16;
  const char* v_src = reinterpret_cast<const char*>(kv.value_cache) + cr.c * 16;
  using L = typename Tr::Layout;
  const int at = L::at(cr.r_first, cr.c);
  const unsigned k_dst = sK + at, v_dst = sV + at;
  int any_hole = 0;  // negative once a row is not loadable
#pragma unroll
  for (int i = 0; i < CR::PASSES; ++i) {
    if (!cr.has(i)) break;
    const int high = static_cast<int>(off[i] >> 32);  // < 0 iff not loadable
    any_hole |= high;
    const bool ok = high >= 0 && chunk_ok;
    const long long src = off[i] & 0x7fffffffffffffffLL;
    cp_async_16(L::rows_on(k_dst, i * CR::ROWS_PER_PASS), k_src + src, ok);
    cp_async_16(L::rows_on(v_dst, i * CR::ROWS_PER_PASS), v_src + src, ok);
  }
  return any_hole < 0;
}

}  // namespace flash
}  // namespace cupy_paged
