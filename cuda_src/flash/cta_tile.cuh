// Which work a flash forward CTA does: its sequence, its query tile's rows and their positions,
// and the key tiles of its split; and each warp's part of it. The G query heads of a kv head
// are packed into the tile's rows (row = token * G + g).
#pragma once
#include "common/pdl.cuh"
#include "common/seq_lookup.cuh"
#include "flash/params.cuh"

namespace cupy_paged {
namespace flash {

// Sequence b owns grid tiles [first_tile(b), first_tile(b + 1)), first_tile(b) = ceil(cum[b] G /
// BM) + b: strictly increasing, ceil(cum[B] G / BM) + B in all, and at least the
// ceil(q_len G / BM) tiles b needs. Known from cum alone: no host data, no sync.
template <int BM>
__device__ __forceinline__ long long first_tile(const int* cum, int b, int group) {
  return (static_cast<long long>(cum[b]) * group + BM - 1) / BM + b;
}

// The b in [0, batch) with first_tile(b) <= tile < first_tile(b + 1).
template <int BM>
__device__ __forceinline__ int sequence_of_tile(const int* cum, int batch, int group,
                                                long long tile) {
  return search_sequence(batch, tile, [=](int b) { return first_tile<BM>(cum, b, group); });
}

// A faulted sequence's split CTA: NaN partial sums for its rows, so the combine writes NaN rows
// (the guard has already written NaN there; the combine would otherwise overwrite them).
// Not inlined: kept out of the main kernel's register allocation.
template <int BM, int THREADS>
__device__ __noinline__ void poison_partials(float* partial_lse, long long first_row,
                                             int num_heads, int group, int head0, int row0,
                                             int rows, int tid) {
  for (int r = tid; r < BM && row0 + r < rows; r += THREADS) {
    const int row = row0 + r, j = row / group;
    partial_lse[(first_row + j) * num_heads + head0 + (row - j * group)] =
        __int_as_float(0x7fc00000);
  }
}

// This thread's warp: its rows (its row group) and its slice of every key tile (all keys when
// KEY_WARPS == 1).
template <class Tr>
struct WarpRole {
  int tid, lane, row_warp, key_warp, key_off;
  __device__ __forceinline__ WarpRole() {
    tid = threadIdx.x;
    lane = tid & 31;
    const int warp = tid >> 5;
    row_warp = warp / Tr::KEY_WARPS;
    key_warp = warp % Tr::KEY_WARPS;
    key_off = key_warp * Tr::WARP_KEYS;
  }
  // The warp's row of fragment row (mf, h) in the tile.
  __device__ __forceinline__ int row(int mf, int h) const {
    return row_warp * Tr::WARP_ROWS + mf * 16 + (lane >> 2) + 8 * h;
  }
};

// Every parameter the later steps need more than once is read here, once: a parameter read after
// an asm memory clobber (cp.async, barriers) is a new load, and expressions of it no longer CSE.
struct CtaTile {
  int group, head_size;  // G, H
  int kvh, split, b;
  int q_begin, rows;     // the sequence's first token and its rows (q_len G)
  int row0;              // the tile's first row
  int past, kv_len;
  int p_first, p_last;   // positions of the tile's first and last row
  int my_lo, my_hi;      // key tiles [my_lo, my_hi): this split's
};

// Fills t for this CTA; false when the CTA has nothing to compute (every exit waits for the
// previous kernel first, and a faulted sequence's split CTA poisons its partial sums).
//
// May be launched programmatically after the prologue (common/pdl.cuh; the plan decides,
// _flash_kernels.overlap_launches): until pdl::wait() (here, or in fwd), only the call's inputs
// (cum, past, block_table) and the guard's verdict (complete: every prologue CTA lets this
// kernel start only after its own wait for the guard) are read, and every CTA waits before it
// exits.
//
// work, num_work: this CTA's work unit and the units of the launch (blockIdx.x and gridDim.x;
// a persistent CTA walks several units).
template <class Tr>
__device__ __forceinline__ bool locate_work(const FwdParams& p, int tid, CtaTile& t,
                                            unsigned work, unsigned num_work) {
  // work = tile * kv_heads + kvh: the kv heads of one query tile are neighbours in the
  // launch order, so CTAs running together read the same cache blocks' token rows (the Nkv
  // heads of a token are adjacent in the cache) rather than 1 / Nkv of each of many blocks.
  const int tile_x = static_cast<int>(work / p.kv_heads);
  t.kvh = static_cast<int>(work - tile_x * p.kv_heads);
  t.split = blockIdx.z;
  t.group = p.group;
  t.head_size = p.head_size;
  const int G = t.group;
  // The guard found cum unusable: nothing maps rows to sequences; it wrote every row NaN.
  if (p.fault != nullptr && p.fault[p.batch] != 0) {
    pdl::wait();
    return false;
  }
  // Heavy tiles (last rows of long sequences see the most keys) are launched first.
  const long long tile = static_cast<long long>(num_work / p.kv_heads) - 1 - tile_x;
  t.b = sequence_of_tile<Tr::BM>(p.cum, p.batch, G, tile);
  t.q_begin = p.cum[t.b];
  const int q_len = p.cum[t.b + 1] - t.q_begin;
  t.rows = q_len * G;
  const long long m_block = tile - first_tile<Tr::BM>(p.cum, t.b, G);
  if (m_block < 0 || m_block * Tr::BM >= t.rows) {  // CTA-uniform, before any barrier
    pdl::wait();
    return false;
  }
  t.row0 = static_cast<int>(m_block) * Tr::BM;
  if (p.fault != nullptr && p.fault[t.b] != 0) {  // faulted sequence: its rows stay NaN
    pdl::wait();  // the previous call's combine has read the partial sums
    if (Tr::SPLITS && p.num_splits > 1)  // SPLITS: compile-time (no call where it is false)
      poison_partials<Tr::BM, Tr::THREADS>(
          p.partial_lse, static_cast<long long>(t.split) * p.num_tokens + t.q_begin,
          p.num_heads, G, t.kvh * G, t.row0, t.rows, tid);
    return false;
  }
  t.past = p.past[t.b];
  t.p_first = t.past + t.row0 / G;                             // position of the first row
  t.p_last = t.past + (min(t.row0 + Tr::BM, t.rows) - 1) / G;  // ... and of the last

  // Key tiles [t_lo, t_hi) hold every key some row of the tile may see: from the first row's
  // window start to the last row's causal end; split `split` takes an even share of them.
  const int k_lo = p.window > 0 ? max(t.p_first - p.window + 1, 0) : 0;
  const int t_lo = k_lo / Tr::BN;
  const int t_hi = t.p_last >= 0 ? t.p_last / Tr::BN + 1 : 0;
  const int n_tiles = max(t_hi - t_lo, 0);
  const int per_split = (n_tiles + p.num_splits - 1) / p.num_splits;
  t.my_lo = t_lo + min(t.split * per_split, n_tiles);
  t.my_hi = t_lo + min((t.split + 1) * per_split, n_tiles);
  t.kv_len = t.past + q_len;
  return true;
}

// The CTA's one work unit (blockIdx.x of gridDim.x).
template <class Tr>
__device__ __forceinline__ bool locate_tile(const FwdParams& p, int tid, CtaTile& t) {
  return locate_work<Tr>(p, tid, t, blockIdx.x, gridDim.x);
}

}  // namespace flash
}  // namespace cupy_paged
