// Tile constants of one flash-kernel instantiation and the invariants they must satisfy: a
// (BM query rows) x (BN keys) tile over a padded head of HEAD channels, WARPS warps of 16*MFRAG
// rows each, STAGES shared-memory buffers of K/V tiles, all inside the arch's shared memory.
// SWIZZLE: the tiles' rows in shared memory are swizzled rather than padded (smem_layout.cuh).
#pragma once
#include "common/arch.cuh"
#include "flash/mma.cuh"
#include "flash/smem_layout.cuh"

namespace cupy_paged {
namespace flash {

// The shared-memory limit of each tile class (common/arch.cuh): its smallest SM's opt-in
// maximum per block. sm80: sm80/87/90/100/103; sm86: sm86/89/120/121.
constexpr int kSmemSm80 = arch::info(80).smem_per_block;
constexpr int kSmemSm86 = arch::info(86).smem_per_block;
static_assert(arch::info(80).cp_async && arch::info(80).mma_k == 16, "cp.async, m16n8k16");

//
// KEY_WARPS > 1 (decode tiles): the warps form WARPS / KEY_WARPS row groups of KEY_WARPS warps;
// the warps of a group share its rows and split every key tile into KEY_WARPS slices of
// WARP_KEYS keys, each with its own online softmax, merged through shared memory at the end
// (a decode step has G rows per kv head: without the split, all but one warp would multiply
// zero rows while the keys stream by).
template <typename T_, int HEAD_, int BM_, int BN_, int WARPS_, int STAGES_, int SMEM_LIMIT_,
          int KEY_WARPS_ = 1, bool SWIZZLE_ = false>
struct Traits {
  using T = T_;
  static constexpr int HEAD = HEAD_;      // padded head size (the MMA's K for Q.K, N for P.V)
  static constexpr int BM = BM_;          // query rows (token, head-in-group pairs) per tile
  static constexpr int BN = BN_;          // keys per tile
  static constexpr int WARPS = WARPS_;
  static constexpr int STAGES = STAGES_;  // K/V tiles in shared memory (STAGES - 1 in flight)
  static constexpr int KEY_WARPS = KEY_WARPS_;  // warps sharing rows, splitting each key tile
  static constexpr int THREADS = 32 * WARPS;
  static constexpr bool SPLITS = true;  // runs split-KV (partial sums for the combine)
  static constexpr int ROW_WARPS = WARPS / KEY_WARPS;
  static constexpr int WARP_ROWS = BM / ROW_WARPS;
  static constexpr int WARP_KEYS = BN / KEY_WARPS;  // keys of a tile one warp multiplies
  static constexpr int MFRAG = WARP_ROWS / 16;  // 16-row MMA fragments per warp
  static constexpr int NFRAG = WARP_KEYS / 8;   // 8-key score fragments per warp
  static constexpr int DFRAG = HEAD / 8;        // 8-channel output fragments
  static constexpr int CHUNKS = HEAD / 8;       // 16-byte chunks per row
  // Rows of the Q, K and V tiles in shared memory (flash/smem_layout.cuh): padded by 16 bytes,
  // or swizzled.
  using Layout = typename RowLayout<SWIZZLE_, HEAD, BN, STAGES>::type;
  static constexpr int ROW_BYTES = Layout::ROW_BYTES;
  static constexpr int Q_BYTES = BM * ROW_BYTES;
  static constexpr int KV_BYTES = BN * ROW_BYTES;  // one stage of K (or of V)
  static constexpr int SMEM_BYTES = Q_BYTES + 2 * STAGES * KV_BYTES + Layout::SIDE_BYTES;

  static_assert(sizeof(T) == 2, "fp16 / bf16 only");
  static_assert(HEAD % 16 == 0 && HEAD >= 16 && HEAD <= 256, "HEAD: multiple of 16, <= 256");
  static_assert(KEY_WARPS >= 1 && WARPS % KEY_WARPS == 0, "KEY_WARPS divides WARPS");
  static_assert(BM % (16 * ROW_WARPS) == 0 && MFRAG >= 1,
                "each warp owns whole 16-row fragments");
  static_assert(BN % (16 * KEY_WARPS) == 0, "each warp's key slice: whole 16-key MMA steps");
  // the merge of a row group's KEY_WARPS partial results (float o, m, l per row and warp)
  // reuses the K/V stages, idle by then
  static constexpr int MERGE_BYTES = KEY_WARPS > 1 ? WARPS * WARP_ROWS * (HEAD + 2) * 4 : 0;
  static_assert(MERGE_BYTES <= 2 * STAGES * KV_BYTES, "the merge fits the K/V stages");
  static_assert((BM & (BM - 1)) == 0 && (BN & (BN - 1)) == 0, "BM, BN: powers of two");
  static_assert(STAGES >= 2, "STAGES >= 2: tile i + STAGES - 1 loads while tile i computes");
  // swizzled rows: a thread's rows r_first + i * (THREADS / CHUNKS) keep r_first's low bits
  static_assert(!SWIZZLE_ || (CHUNKS & (CHUNKS - 1)) == 0, "swizzled rows: CHUNKS a power of 2");
  static_assert(Q_BYTES % 128 == 0 && KV_BYTES % 128 == 0, "tiles start on 128-byte lines");
  static_assert(SMEM_BYTES <= SMEM_LIMIT_, "tile does not fit the arch's shared memory");
};

// A CTA's dynamic shared memory (Traits::SMEM_BYTES, 128-byte aligned: the swizzled layout's
// address arithmetic needs whole lines): the Q tile (reused to stage the output), STAGES K and
// STAGES V tiles (reused by the key-warp merge), and the key side data of the swizzled layout.
template <class Tr>
struct FwdSmem {
  unsigned char *q, *k, *v, *side;
  unsigned q_addr, k_addr, v_addr;  // shared-space addresses of q, k, v
  __device__ __forceinline__ explicit FwdSmem(unsigned char* base)
      : q(base),
        k(base + Tr::Q_BYTES),
        v(k + Tr::STAGES * Tr::KV_BYTES),
        side(v + Tr::STAGES * Tr::KV_BYTES),
        q_addr(smem_addr(q)),
        k_addr(smem_addr(k)),
        v_addr(smem_addr(v)) {}
};

}  // namespace flash
}  // namespace cupy_paged
