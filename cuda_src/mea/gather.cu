// Paged -> packed varlen K/V for the CUTLASS memory-efficient kernel: row seqstart_k[b] + k of
// k_packed/v_packed holds position k of sequence b, read through the block table; unmapped
// positions become zeros. cupy_paged/backends/_gather.py generates the extern "C" entries.
#pragma once
#include "common/dtypes.cuh"
#include "common/paged_kv.cuh"
#include "common/seq_lookup.cuh"
#include "guard/fault_codes.cuh"
#include "mea/params.cuh"

namespace cupy_paged {
namespace mea {

// One thread per (row, 16-byte chunk of the row's Nkv*H channels) in a grid-stride loop: a
// slot's Nkv*H channels are contiguous in the cache and in the output, so each warp copies
// 512 contiguous bytes. The loop ends at min(seqstart_k[B], rows_bound), read on the device:
// the grid is sized from the host's bound and rows past the real total cost nothing.
//
// key_cache, value_cache: (num_blocks, block_size, Nkv, H); block_table: (B, max_blocks) int32
// seqstart_k: (B+1,) int32, seqstart_k[b+1] - seqstart_k[b] = past[b] + q_len[b]
// (0 for a faulted sequence); any values stay in bounds: the cursor returns some b in [0, B)
// and PagedKV::slot reads only table cells and cache slots that exist.
// fault: the metadata guard's (B+1,) int32 verdict, or nullptr: nothing is gathered when
// fault[B] != 0, and rows of a sequence with fault[b] != 0 are left as they are.
// k_packed, v_packed: (rows_bound, Nkv, H); rows >= seqstart_k[B] are left as they are.
template <typename T>
__device__ __forceinline__ void gather_kv(const GatherParams& p) {
  const T* __restrict__ key_cache = static_cast<const T*>(p.key_cache);
  const T* __restrict__ value_cache = static_cast<const T*>(p.value_cache);
  const int* __restrict__ block_table = p.block_table;
  const int* __restrict__ seqstart_k = p.seqstart_k;
  const int* __restrict__ fault = p.fault;
  T* __restrict__ k_packed = static_cast<T*>(p.k_packed);
  T* __restrict__ v_packed = static_cast<T*>(p.v_packed);
  const int batch = p.batch, kv_heads = p.kv_heads, head_size = p.head_size,
            block_size = p.block_size, num_blocks = p.num_blocks, max_blocks = p.max_blocks,
            rows_bound = p.rows_bound;
  if (batch <= 0 || guard::batch_faulted(fault, batch)) return;
  const PagedKV<const T> kv{key_cache, value_cache, block_table, num_blocks, max_blocks,
                            kv_heads * head_size, BlockDiv::of(block_size)};
  const int total = seqstart_k[batch];
  const long long rows = total < rows_bound ? (total > 0 ? total : 0) : rows_bound;
  const long long row_chunks = kv.token_stride / 8;
  const long long items = rows * row_chunks;
  SequenceCursor seq(seqstart_k, batch);

  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long row = i / row_chunks;
    const long long c0 = (i % row_chunks) * 8;
    const int b = seq.seek(row);
    if (guard::sequence_faulted(fault, b)) continue;
    const long long slot = kv.slot(b, row - seq.begin);
    const long long dst = row * kv.token_stride + c0;
    if (slot < 0) {  // unmapped: the attention kernel masks it; never read the cache there
      Vec8<T>::zero().store(k_packed + dst);
      Vec8<T>::zero().store(v_packed + dst);
    } else {
      const Vec8<T> k = Vec8<T>::load(key_cache + slot + c0);
      const Vec8<T> v = Vec8<T>::load(value_cache + slot + c0);
      k.store(k_packed + dst);
      v.store(v_packed + dst);
    }
  }
}

}  // namespace mea
}  // namespace cupy_paged
