// The shared-memory layout of the sm90a kernel's Q, K and V tiles: what wgmma reads with
// 128-byte swizzling (hopper/wgmma.cuh). A tile of ROWS rows is split by channel into panels of
// 64 channels (128 bytes a row); panel p holds its rows at 128-byte stride (ROWS * 128 bytes a
// panel), and the 16-byte chunk c of row r sits at chunk c ^ (r % 8) of its line, so the
// eight rows of an atom spread every chunk column over all 32 banks. Tiles start on 1024-byte
// boundaries (the swizzle repeats every 8 rows).
#pragma once

namespace cupy_paged {
namespace hopper {

template <int ROWS>
struct SwizzledTile {
  static constexpr unsigned PANEL_BYTES = ROWS * 128;
  // Byte offset of chunk c (channels 8 c .. 8 c + 7) of row r.
  __device__ __forceinline__ static unsigned chunk(int r, int c) {
    return (c >> 3) * PANEL_BYTES + r * 128 + (((c & 7) ^ (r & 7)) << 4);
  }
  // Byte offset of row r, channel 16 k of its panel (a K-major MMA operand's start).
  __device__ __forceinline__ static unsigned k_step(int r, int k) {
    return (k >> 2) * PANEL_BYTES + r * 128 + (k & 3) * 32;
  }
};

}  // namespace hopper
}  // namespace cupy_paged
