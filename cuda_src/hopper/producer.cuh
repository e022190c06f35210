// The producer warpgroup of the sm90a flash kernel: it copies the Q tile and then each K/V
// tile of the CTA's key range, straight from the paged cache through the block table (any
// block size, cp.async with zero-fill), into the STAGES-deep K and V rings of swizzled tiles.
// Each tile: resolve its key rows (one per thread: block-table loads, before any wait), wait
// until the consumers freed its K stage, publish the offsets and the tile's hole flag, issue the
// K copies; wait for its V stage, issue the V copies. A full barrier completes when its copies
// land (cp.async arrivals): the producer never waits for its own copies.
#pragma once
#include "flash/kv_stages.cuh"
#include "flash/mma.cuh"
#include "flash/paged_tiles.cuh"
#include "hopper/smem.cuh"
#include "hopper/swizzle_tile.cuh"
#include "hopper/sync.cuh"

namespace cupy_paged {
namespace hopper {

// The producer as flash/paged_tiles.cuh's KeyRowOffsets sees it: BN key rows over 128 threads.
template <class Tr>
struct ProducerShape {
  using T = typename Tr::T;
  static constexpr int BN = Tr::BN;
  static constexpr int THREADS = Tr::PRODUCER_THREADS;
};

// One producer thread's part of a K or V tile: chunk c of rows r0 + i * PER_PASS. Their cache
// rows are read from shared memory once per tile, before any copy, and serve both the K and the
// V copies; a row's chunk is then one 64-bit multiply-add and one cp.async.
template <class Tr>
struct TileRows {
  static constexpr int PER_PASS = Tr::PRODUCER_THREADS / Tr::CHUNKS;
  static constexpr int PASSES = (Tr::BN + PER_PASS - 1) / PER_PASS;
  int c, r0;
  int row[PASSES];  // the cache row (token slot) of each of the thread's keys, -1: not loadable
  bool active, chunk_ok;

  __device__ __forceinline__ TileRows(int tid, int head_size)
      : c(tid % Tr::CHUNKS), r0(tid / Tr::CHUNKS) {
    active = r0 < PER_PASS;  // CHUNKS does not divide 128: these threads idle
    chunk_ok = c * 8 < head_size;
  }
  __device__ __forceinline__ void read(const int* key_rows) {
#pragma unroll
    for (int i = 0; i < PASSES; ++i) {
      const int r = r0 + i * PER_PASS;
      row[i] = active && (Tr::BN % PER_PASS == 0 || r < Tr::BN) ? key_rows[r] : -1;
    }
  }
  // The copies into the swizzled tile at dst from the cache at src (this kv head's channel 0;
  // row_bytes: one cache row, Nkv * H * 2 < 2^32). A row that is not loadable reads nothing
  // (zero-fill) from the tile's first row address.
  __device__ __forceinline__ void copy(unsigned dst, const char* src, unsigned row_bytes) const {
    if (!active) return;
    src += c * 16;
#pragma unroll
    for (int i = 0; i < PASSES; ++i) {
      const int r = r0 + i * PER_PASS;
      if (Tr::BN % PER_PASS != 0 && r >= Tr::BN) break;
      const bool ok = chunk_ok && row[i] >= 0;
      const unsigned long long at =
          static_cast<unsigned long long>(static_cast<unsigned>(ok ? row[i] : 0)) * row_bytes;
      flash::cp_async_16(dst + SwizzledTile<Tr::BN>::chunk(r, c), src + at, ok);
    }
  }
};

// Copies ROWS rows of CHUNKS 16-byte chunks into the swizzled tile at `dst`: chunk c of row r
// from src(r) + 16 c (bytes), or zeros when valid(r) is false or channel 8 c >= head_size.
template <class Tr, int ROWS, class Src, class Valid>
__device__ __forceinline__ void copy_rows(unsigned dst, int head_size, int tid, Src src,
                                          Valid valid) {
  constexpr int PER_PASS = Tr::PRODUCER_THREADS / Tr::CHUNKS;  // rows per pass
  constexpr int PASSES = (ROWS + PER_PASS - 1) / PER_PASS;
  const int c = tid % Tr::CHUNKS, r0 = tid / Tr::CHUNKS;
  if (r0 >= PER_PASS) return;  // CHUNKS does not divide 128: these threads idle
  const bool chunk_ok = c * 8 < head_size;
#pragma unroll 4
  for (int i = 0; i < PASSES; ++i) {
    const int r = r0 + i * PER_PASS;
    if (ROWS % PER_PASS != 0 && r >= ROWS) break;
    const bool ok = chunk_ok && valid(r);
    flash::cp_async_16(dst + SwizzledTile<ROWS>::chunk(r, c), ok ? src(r) + c * 16 : src(0), ok);
  }
}

template <class Tr>
struct Producer {
  using T = typename Tr::T;
  using Offsets = flash::KeyRowOffsets<ProducerShape<Tr>>;
  const Smem90<Tr>& sm;
  flash::KeyView<Tr> kv;
  int kv_len, head_size, tid;

  __device__ __forceinline__ Producer(const flash::FwdParams& p, const flash::CtaTile& t,
                                      const Smem90<Tr>& sm_, int tid_)
      : sm(sm_),
        kv(flash::key_view<Tr>(p, t)),
        kv_len(t.kv_len),
        head_size(t.head_size),
        tid(tid_) {}

  // The Q tile: row r is sequence row row0 + r = (token j, head g), zeros past `rows`.
  __device__ __forceinline__ void load_q(const flash::FwdParams& p,
                                         const flash::CtaTile& t) const {
    const char* q = static_cast<const char*>(p.q);
    const int G = t.group, N = p.num_heads, H = t.head_size;
    const long long q_begin = t.q_begin;
    const int head0 = t.kvh * G, row0 = t.row0, rows = t.rows;
    copy_rows<Tr, Tr::BM>(
        sm.q_addr, H, tid,
        [=](int r) {
          const int row = row0 + r, j = row / G;
          return q + ((q_begin + j) * N + head0 + (row - j * G)) * H * 2;
        },
        [=](int r) { return row0 + r < rows; });
    flash::cp_async_commit();
    mbar_arrive_on_copies(sm.q_full);
  }

  // Tile kt into stage `stage` of both rings (its n-th use: the consumers freed it n times).
  __device__ __forceinline__ void load_tile(int kt, int stage, int n) const {
    Offsets keys;
    keys.look_up(kv, kv_len, kt * Tr::BN, tid);
    if (n > 0) mbar_wait(sm.k_empty(stage), (n - 1) & 1);
    int* key_rows = sm.key_rows(stage);
    bool mine = false;
    if (tid < Tr::BN) {  // look_up's one key per thread (PER_THREAD = 1: BN <= 128)
      const int r = kv.mapped(keys.block[0]) ? keys.block[0] * kv.blocks.size + keys.slot[0] : -1;
      key_rows[tid] = r;
      mine = r < 0;
    }
    // Every producer thread's rows are visible to the others; whether any key is a hole.
    const bool hole = named_sync_or(1, Tr::PRODUCER_THREADS, mine);
    TileRows<Tr> rows(tid, head_size);
    rows.read(key_rows);
    const unsigned row_bytes = static_cast<unsigned>(kv.token_stride) * sizeof(T);
    rows.copy(sm.k_addr(stage), reinterpret_cast<const char*>(kv.key_cache), row_bytes);
    flash::cp_async_commit();
    mbar_arrive_on_copies(sm.k_full(stage));
    if (tid < Tr::BN) {  // this thread's key row (and thread 0's hole flag), released
      if (tid == 0) sm.holes()[stage] = hole;
      mbar_arrive(sm.k_full(stage));
    }
    if (n > 0) mbar_wait(sm.v_empty(stage), (n - 1) & 1);
    rows.copy(sm.v_addr(stage), reinterpret_cast<const char*>(kv.value_cache), row_bytes);
    flash::cp_async_commit();
    mbar_arrive_on_copies(sm.v_full(stage));
  }

  __device__ __forceinline__ void run(const flash::FwdParams& p, const flash::CtaTile& t) const {
    load_q(p, t);
    int stage = 0, n = 0;
    for (int kt = t.my_lo; kt < t.my_hi; ++kt) {
      load_tile(kt, stage, n);
      if (++stage == Tr::STAGES) {
        stage = 0;
        ++n;
      }
    }
    flash::cp_async_wait<0>();  // nothing in flight when the thread exits
  }
};

}  // namespace hopper
}  // namespace cupy_paged
