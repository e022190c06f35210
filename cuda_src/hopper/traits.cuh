// Tile constants of one sm90a flash instantiation (hopper/fwd_kernel.cuh): a CTA of one
// producer warpgroup and two consumer warpgroups over a 128-row query tile (64 rows each),
// BN-key K tiles and V tiles in two STAGES-deep rings, every tile stored as 128-byte swizzled
// panels of 64 channels (hopper/swizzle_tile.cuh). The names the shared flash steps read (BM, BN, MFRAG,
// NFRAG, DFRAG, KEY_WARPS, THREADS, ...) mean what they mean in flash/traits.cuh, a consumer
// warp playing an sm80 warp of one 16-row fragment.
#pragma once
#include "common/arch.cuh"

namespace cupy_paged {
namespace hopper {

constexpr int kSmemSm90 = arch::info(90).smem_per_block;

// PINGPONG: the two consumer warpgroups take turns issuing their MMAs (hopper/consumer.cuh), so
// one group's softmax runs under the other's MMAs (FlashAttention-3's inter-warpgroup schedule,
// Shah et al. 2024, section 3.1). PERSISTENT: one CTA per SM walks work units (query tile, kv
// head) blockIdx.x, + gridDim.x, ...: the producer loads the next unit's K/V (and, once the
// consumers have written the output, its Q) while the consumers finish the current one.
template <typename T_, int HEAD_, int BN_, int STAGES_, bool PINGPONG_ = false,
          bool PERSISTENT_ = false>
struct Traits90 {
  using T = T_;
  static constexpr bool PINGPONG = PINGPONG_;
  static constexpr bool PERSISTENT = PERSISTENT_;
  static constexpr int HEAD = HEAD_;  // padded head: the S MMA's K, the P V MMA's N
  static constexpr int BN = BN_;      // keys per tile: the S MMA's N
  static constexpr int STAGES = STAGES_;
  static constexpr int CONSUMERS = 2;                    // consumer warpgroups
  static constexpr int GROUP_ROWS = 64;                  // rows of one consumer warpgroup
  static constexpr int BM = CONSUMERS * GROUP_ROWS;      // query rows of the CTA tile
  static constexpr int THREADS = 128 * (1 + CONSUMERS);  // producer group first
  static constexpr int PRODUCER_THREADS = 128;
  static constexpr bool SPLITS = false;  // one key split (no partial sums, no poisoning)
  static constexpr int WARPS = 4 * CONSUMERS;  // consumer warps
  static constexpr int KEY_WARPS = 1;
  static constexpr int ROW_WARPS = WARPS;
  static constexpr int WARP_ROWS = 16;
  static constexpr int WARP_KEYS = BN;
  static constexpr int MFRAG = 1;
  static constexpr int NFRAG = BN / 8;
  static constexpr int DFRAG = HEAD / 8;
  static constexpr int CHUNKS = HEAD / 8;              // 16-byte chunks of a row
  static constexpr int PANELS = (HEAD + 63) / 64;      // 128-byte panels of a row
  static constexpr int Q_BYTES = BM * PANELS * 128;
  static constexpr int KV_BYTES = BN * PANELS * 128;   // one stage of K (or of V)
  static constexpr int OFFSETS_BYTES = BN * 4;         // a stage's key rows (int32)
  // Registers per thread after reallocation: producer, consumers (128 p + 256 c: the
  // 168 x 384 the launch holds, __launch_bounds__(384, 1)).
  // A persistent producer keeps its unit loop's state live across the copies: 16 more.
  static constexpr int PRODUCER_REGS = PERSISTENT ? 72 : 56;
  static constexpr int CONSUMER_REGS = PERSISTENT ? 216 : 224;
  // Shared memory: Q_BUFS Q tiles, the K ring, the V ring, the key offsets and hole flags of
  // each K stage, the work-unit slots (PERSISTENT), then the mbarriers (q_full[Q_BUFS],
  // q_empty[Q_BUFS]; per stage k_full, v_full, k_empty, v_empty; PERSISTENT: unit_full[2],
  // unit_empty[2]). A unit's output rows are staged in its own Q tile.
  static constexpr int HOLES_BYTES = 16 * ((STAGES * 4 + 15) / 16);
  static constexpr int UNIT_SLOT_BYTES = 64;  // hopper/smem.cuh's UnitSlot
  static constexpr int UNITS_BYTES = PERSISTENT ? 2 * UNIT_SLOT_BYTES : 0;
  static constexpr int RINGS_BYTES = 2 * STAGES * KV_BYTES;
  static constexpr int TAIL_BYTES =
      STAGES * OFFSETS_BYTES + HOLES_BYTES + UNITS_BYTES + 8 * (4 + 4 * STAGES + 4);
  // A persistent CTA double-buffers Q where it fits (every head but 256): the next unit's Q
  // loads while this unit still computes, and its output is staged in this unit's Q.
  static constexpr int Q_BUFS =
      PERSISTENT && 2 * Q_BYTES + RINGS_BYTES + TAIL_BYTES <= kSmemSm90 ? 2 : 1;
  static constexpr int K_OFF = Q_BUFS * Q_BYTES;
  static constexpr int V_OFF = K_OFF + STAGES * KV_BYTES;
  static constexpr int OFFSETS_OFF = V_OFF + STAGES * KV_BYTES;
  static constexpr int HOLES_OFF = OFFSETS_OFF + STAGES * OFFSETS_BYTES;
  static constexpr int UNITS_OFF = HOLES_OFF + HOLES_BYTES;
  static constexpr int BARS_OFF = UNITS_OFF + UNITS_BYTES;
  static constexpr int NUM_BARS = 2 * Q_BUFS + 4 * STAGES + (PERSISTENT ? 4 : 0);
  static constexpr int SMEM_BYTES = BARS_OFF + 8 * NUM_BARS;

  static_assert(sizeof(T) == 2, "fp16 / bf16 only");
  static_assert(HEAD % 16 == 0 && HEAD >= 64 && HEAD <= 256, "HEAD: multiple of 16 in [64, 256]");
  static_assert(BN == 64 || BN == 128, "BN: an S MMA shape (hopper/wgmma_ops.cuh)");
  static_assert(BN <= PRODUCER_THREADS, "one key row looked up per producer thread");
  // the consumers hold K of tile j and V of tile j - 1 at once; the producer reuses a tile's
  // key offsets slot only after every producer thread has issued that tile's V copies, which
  // its per-tile named barrier guarantees from the second tile on
  static_assert(STAGES >= 2, "STAGES >= 2");
  static_assert(PRODUCER_REGS * 128 + CONSUMER_REGS * 128 * CONSUMERS <= 168 * THREADS,
                "register reallocation fits the register file");
  static_assert(SMEM_BYTES <= kSmemSm90, "tile does not fit sm90's shared memory");
};

}  // namespace hopper
}  // namespace cupy_paged
