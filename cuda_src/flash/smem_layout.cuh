// Shared-memory row layouts of the flash kernel's Q, K and V tiles: where chunk c (16 bytes,
// 8 channels) of tile row r lives, how an ldmatrix lane walks its row, and where each key's side
// data is kept: its byte offset in the cache (negative: not loadable), in one of STAGES + 1
// slots (flash/kv_stages.cuh says why one more than the stages).
//
// PaddedRows: rows of HEAD + 8 elements. The 16-byte pad makes the row stride an odd number of
// 16-byte units, so the 8 row addresses of an ldmatrix hit 8 distinct bank groups, every
// fragment address is a base plus a compile-time constant, and the pads hold the side data
// (slot s < STAGES: stage s's V row pads; slot STAGES: stage 0's K row pads).
// But every other row starts 16 bytes into a 32-byte sector, and a cp.async into such a row
// costs the L2 extra sectors and requests (measured: benchmarks/NOTES.md, session 5).
//
// SwizzledRows: rows of exactly HEAD elements (HEAD % 64 == 0: whole 128-byte lines) and chunk
// c of row r stored at chunk c ^ (r % 8) (the XOR swizzle of CUTLASS and FlashAttention-2): the
// 8 rows of an ldmatrix still hit 8 bank groups, every copy lands on whole sectors, and the side
// data lives in an array after the K/V stages. A fragment address then needs an XOR as well
// as an add, which the aligned copies repay in prefill too (its K/V tiles are re-read from L2
// by every query tile): every tile whose head allows it takes this layout
// (_flash_tiles.SWIZZLE_HEADS); other heads keep the padded one.
#pragma once

namespace cupy_paged {
namespace flash {

// A column of values of type V, one per tile row, `stride` bytes apart (a K/V tile's side data:
// in the row pads, or in a dense array).
template <typename V>
struct SideColumn {
  unsigned char* base;  // row 0's value
  int stride;
  __device__ __forceinline__ V& operator[](int r) const {
    return *reinterpret_cast<V*>(base + r * stride);
  }
};

template <int HEAD, int BN, int STAGES>
struct PaddedRows {
  static constexpr int ROW_BYTES = (HEAD + 8) * 2;
  static constexpr int SIDE_BYTES = 0;  // the side data lives in the pads
  static_assert((ROW_BYTES / 16) % 2 == 1, "padded row stride: an odd number of 16 B");

  // Byte offset of chunk c of row r in its tile.
  __device__ __forceinline__ static int at(int r, int c) { return r * ROW_BYTES + c * 16; }
  // at(r + rows, c) from a = at(r, c), where r < rows' lowest set bit (ChunkRows passes).
  __device__ __forceinline__ static unsigned rows_on(unsigned a, int rows) {
    return a + rows * ROW_BYTES;
  }
  // The address of an ldmatrix lane's 16 bytes at row r, chunk h of tile address `tile`, and
  // from it (`lane`) the lane's address at chunk 2 k + h (k: a compile-time MMA k-step), plus
  // any multiple of 8 rows added to `lane` in between.
  __device__ __forceinline__ static unsigned lane_base(unsigned tile, int r, int h) {
    return tile + r * ROW_BYTES + h * 16;
  }
  __device__ __forceinline__ static unsigned step(unsigned lane, int k) { return lane + k * 32; }
  // Key offsets (long long) of side slot s (0 <= s <= STAGES).
  __device__ __forceinline__ static SideColumn<long long> offsets(unsigned char* k_stages,
                                                                  unsigned char* v_stages,
                                                                  unsigned char*, int s) {
    return {(s < STAGES ? v_stages + s * BN * ROW_BYTES : k_stages) + HEAD * 2, ROW_BYTES};
  }
};

template <int HEAD, int BN, int STAGES>
struct SwizzledRows {
  static constexpr int ROW_BYTES = HEAD * 2;
  // side data: STAGES + 1 slots of BN key offsets (8 bytes)
  static constexpr int SIDE_BYTES = (STAGES + 1) * BN * 8;
  static_assert(HEAD % 64 == 0, "swizzled rows: whole 128-byte lines (8 chunks)");

  __device__ __forceinline__ static int at(int r, int c) {
    return r * ROW_BYTES + ((c ^ (r & 7)) << 4);
  }
  // r + rows has r's low 3 bits XOR rows' (no carry: r < rows' lowest set bit), so the chunk
  // moves by an XOR with a compile-time constant.
  __device__ __forceinline__ static unsigned rows_on(unsigned a, int rows) {
    return (a ^ ((rows & 7) << 4)) + rows * ROW_BYTES;
  }
  // Chunk 2 k + h of row r sits at 16 ((2 k + h) ^ s), s = r % 8; with x = h ^ s that is
  // 128 (k / 4) + (32 (k % 4) ^ 16 x): an XOR and an add on the lane's base. Exact when the tile
  // address is 128-byte aligned (bits 4-6 of the base are then x's alone).
  __device__ __forceinline__ static unsigned lane_base(unsigned tile, int r, int h) {
    return tile + r * ROW_BYTES + ((h ^ (r & 7)) << 4);
  }
  __device__ __forceinline__ static unsigned step(unsigned lane, int k) {
    return (lane ^ ((k & 3) << 5)) + (k >> 2) * 128;
  }
  __device__ __forceinline__ static SideColumn<long long> offsets(unsigned char*,
                                                                  unsigned char*,
                                                                  unsigned char* side, int s) {
    return {side + s * BN * 8, 8};
  }
};

// The layout a Traits<..., SWIZZLE> tile uses (NVRTC has no <type_traits>).
template <bool SWIZZLE, int HEAD, int BN, int STAGES>
struct RowLayout {
  using type = PaddedRows<HEAD, BN, STAGES>;
};
template <int HEAD, int BN, int STAGES>
struct RowLayout<true, HEAD, BN, STAGES> {
  using type = SwizzledRows<HEAD, BN, STAGES>;
};

}  // namespace flash
}  // namespace cupy_paged
