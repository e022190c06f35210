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

// The producer warpgroup. Its state across work units: how many tiles it has loaded (tile i
// goes to stage i % STAGES, the (i / STAGES)-th use of that stage) and how many Q tiles.
template <class Tr>
struct Producer {
  using T = typename Tr::T;
  using Offsets = flash::KeyRowOffsets<ProducerShape<Tr>>;
  const Smem90<Tr> sm;
  int tid;
  int tiles = 0, q_tiles = 0;

  __device__ __forceinline__ Producer(const flash::FwdParams&, const Smem90<Tr>& sm_, int tid_)
      : sm(sm_), tid(tid_) {}

  // The Q tile: row r is sequence row row0 + r = (token j, head g), zeros past `rows`; its
  // buffer (tile q_tiles % Q_BUFS) is free once the consumers have written the output of the
  // unit that used it last.
  __device__ __forceinline__ void load_q(const flash::FwdParams& p, const flash::CtaTile& t) {
    const int buf = q_tiles % Tr::Q_BUFS, use = q_tiles / Tr::Q_BUFS;
    if (use > 0) mbar_wait(sm.q_empty(buf), (use - 1) & 1);
    ++q_tiles;
    const char* q = static_cast<const char*>(p.q);
    const int G = t.group, N = p.num_heads, H = t.head_size;
    const long long q_begin = t.q_begin;
    const int head0 = t.kvh * G, row0 = t.row0, rows = t.rows;
    copy_rows<Tr, Tr::BM>(
        sm.q_addr(buf), H, tid,
        [=](int r) {
          const int row = row0 + r, j = row / G;
          return q + ((q_begin + j) * N + head0 + (row - j * G)) * H * 2;
        },
        [=](int r) { return row0 + r < rows; });
    flash::cp_async_commit();
    mbar_arrive_on_copies(sm.q_full(buf));
  }

  // Key tile kt of the unit whose keys are kv into stage `stage` of both rings (its n-th use:
  // the consumers freed it n times).
  __device__ __forceinline__ void load_tile(const flash::KeyView<Tr>& kv, int kv_len,
                                            int head_size, int kt, int stage, int n) const {
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

  // One work unit: its Q, then its key tiles.
  __device__ __forceinline__ void run(const flash::FwdParams& p, const flash::CtaTile& t) {
    load_q(p, t);
    const flash::KeyView<Tr> kv = flash::key_view<Tr>(p, t);
    for (int kt = t.my_lo; kt < t.my_hi; ++kt, ++tiles)
      load_tile(kv, t.kv_len, t.head_size, kt, tiles % Tr::STAGES, tiles / Tr::STAGES);
  }

  // A persistent CTA (Traits90::PERSISTENT): units blockIdx.x, then whatever the launch's
  // counter hands out (p.work_counter[0] + gridDim.x: dynamic, heavy units first, so the SMs
  // finish together). Thread 0 locates each unit and publishes it in slot n % 2 for the whole
  // CTA (the consumers read it there instead of locating it again), fetching the next index
  // while the unit's tiles load. The last CTA to finish resets the counter for the next launch.
  __device__ __forceinline__ void run_all(const flash::FwdParams& p) {
    unsigned unit = blockIdx.x, next = 0;
    for (int n = 0;; ++n) {
      const int slot = n & 1;
      if (tid == 0) {
        if (n >= 2) mbar_wait(sm.unit_empty(slot), ((n >> 1) - 1) & 1);
        UnitSlot* u = sm.unit(slot);
        int state = -1;
        if (unit < static_cast<unsigned>(p.num_work)) {
          state = flash::locate_work<Tr>(p, tid, u->t, unit, p.num_work) ? 1 : 0;
          next = static_cast<unsigned>(atomicAdd(p.work_counter, 1)) + gridDim.x;
        }
        u->state = state;
        mbar_arrive(sm.unit_full(slot));
      }
      mbar_wait(sm.unit_full(slot), (n >> 1) & 1);
      const UnitSlot* u = sm.unit(slot);
      const int state = u->state;
      const flash::CtaTile t = u->t;
      release(sm.unit_empty(slot), tid & 31);  // every warp: its threads have read the slot
      if (state < 0) break;
      if (state > 0) run(p, t);
      unit = next;
    }
    if (tid == 0 && atomicAdd(p.work_counter + 1, 1) == static_cast<int>(gridDim.x) - 1) {
      // every CTA has taken its last index: the counter starts from 0 again
      atomicExch(p.work_counter, 0);
      atomicExch(p.work_counter + 1, 0);
    }
  }
};

}  // namespace hopper
}  // namespace cupy_paged
