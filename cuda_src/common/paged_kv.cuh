// PagedKV: the paged cache as a view. Two caches (num_blocks, block_size, Nkv, H) and the
// (B, max_blocks) int32 block table; slot(b, pos) is the 64-bit element offset of position pos
// of sequence b, i.e. of cache element (block_table[b][pos / block_size], pos % block_size, 0, 0).
#pragma once

namespace cupy_paged {

template <typename T>  // T, or const T for a read-only view
struct PagedKV {
  T* key_cache;            // (num_blocks, block_size, Nkv, H)
  T* value_cache;          // (num_blocks, block_size, Nkv, H)
  const int* block_table;  // (B, max_blocks), -1 = unmapped
  int num_blocks;
  int block_size;
  int kv_heads;            // Nkv
  int head_size;           // H
  int max_blocks;          // row stride of block_table

  // Elements of one token's slot: Nkv heads of H channels, contiguous.
  __device__ __forceinline__ long long slot_elems() const {
    return static_cast<long long>(kv_heads) * head_size;
  }

  // Offset of (block, pos % block_size, 0, 0), or -1 when the block is unmapped. Positions past
  // the table and ids outside [0, num_blocks) count as unmapped too, so unvalidated metadata
  // (validate=False) can give wrong values but never an access outside the table or the caches.
  // 64-bit: a 16k-block x 256 x 8 x 128 cache has 2^32 elements.
  __device__ __forceinline__ long long slot(int b, long long pos) const {
    if (pos < 0 || pos >= static_cast<long long>(max_blocks) * block_size) return -1;
    const int block = block_table[static_cast<long long>(b) * max_blocks + pos / block_size];
    if (block < 0 || block >= num_blocks) return -1;
    return (static_cast<long long>(block) * block_size + pos % block_size) * slot_elems();
  }
};

}  // namespace cupy_paged
