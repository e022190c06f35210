// The paged KV cache as a view: two caches (num_blocks, block_size, Nkv, H) and the
// (B, max_blocks) int32 block table. Position pos of sequence b lives in block
// block_table[b][pos / block_size], slot pos % block_size; offsets are 64-bit element offsets
// (a 16k-block x 256 x 8 x 128 cache has 2^32 elements).
#pragma once

namespace cupy_paged {

// n / d and n % d for 0 <= n < 2^31 and a runtime d >= 1: shifts for powers of two, otherwise
// Granlund-Montgomery: q = umulhi(n, m) >> s with p = 31 + ceil(log2 d), m = ceil(2^p / d),
// s = p - 32 (exact for n < 2^31). The flash host side computes m and s
// (cupy_paged/backends/_flash_kernels.block_divisor); `of` computes the same on the device.
struct BlockDiv {
  int size;      // block_size
  int shift;     // log2(block_size) if a power of two, else -1
  unsigned magic;
  int magic_shift;

  __device__ __forceinline__ static BlockDiv of(int d) {
    if ((d & (d - 1)) == 0) return {d, 31 - __clz(d), 0u, 0};
    const int p = 31 + (32 - __clz(d - 1));
    const unsigned long long u = static_cast<unsigned>(d);
    return {d, -1, static_cast<unsigned>(((1ull << p) + u - 1) / u), p - 32};
  }
  __device__ __forceinline__ int div(int n) const {
    return shift >= 0 ? (n >> shift)
                      : static_cast<int>(__umulhi(static_cast<unsigned>(n), magic) >> magic_shift);
  }
};

// T, or const T for a read-only view. A view of one sequence and one head (the flash kernel's)
// has block_table advanced to the sequence's row and the caches to the head's channel 0.
template <typename T>
struct PagedKV {
  T* key_cache;            // (num_blocks, block_size, Nkv, H)
  T* value_cache;          // (num_blocks, block_size, Nkv, H)
  const int* block_table;  // (B, max_blocks), -1 = unmapped
  int num_blocks;
  int max_blocks;          // row stride of block_table
  int token_stride;        // Nkv * H: elements of one slot (every head of a token), < 2^31
  BlockDiv blocks;

  // Unvalidated metadata (validate=False) may hold any ids: only [0, num_blocks) are blocks.
  __device__ __forceinline__ bool mapped(int block) const {
    return static_cast<unsigned>(block) < static_cast<unsigned>(num_blocks);  // one compare
  }
  // Element offset of slot `slot` of block `block` (mapped).
  __device__ __forceinline__ long long offset(int block, int slot) const {
    return (static_cast<long long>(block) * blocks.size + slot) * token_stride;
  }
  // Offset of position pos of sequence b, or -1 when its block is unmapped. Positions outside
  // the table count as unmapped too, so wrong metadata gives wrong values but never an access
  // outside the table or the caches.
  __device__ __forceinline__ long long slot(int b, long long pos) const {
    if (pos < 0 || pos >= static_cast<long long>(max_blocks) * blocks.size || pos > 0x7fffffff)
      return -1;
    const int column = blocks.div(static_cast<int>(pos));
    const int block = block_table[static_cast<long long>(b) * max_blocks + column];
    if (!mapped(block)) return -1;
    return offset(block, static_cast<int>(pos) - column * blocks.size);
  }
};

}  // namespace cupy_paged
