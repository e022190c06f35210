// The attention prologue (spec steps 1-3) in one pass over (new token, head, 8-channel chunk):
// split packed QKV, rotate Q and K in float32 at the token's absolute position, write Q to q_out
// and K, V into the paged cache. cupy_paged/backends/_prologue.py generates the extern "C" entries.
#pragma once
#include "common/dtypes.cuh"
#include "common/paged_kv.cuh"
#include "common/rotary.cuh"
#include "common/seq_lookup.cuh"
#include "guard/fault_codes.cuh"

namespace cupy_paged {
namespace prologue {

// One thread per (token t, head slot s, chunk c) in a grid-stride loop, t-major, so consecutive
// threads move consecutive 16 bytes of one row. Head slots: [0, q_heads) are Q heads (only when
// write_q: packed or rotary input; otherwise the caller attends with query itself), then Nkv K
// heads, then Nkv V heads.
//
// query: (T, N*H), or packed (T, (N + 2*Nkv)*H) = [Q heads | K heads | V heads]
// key, value: (T, Nkv*H) each (unused when packed)
// key_cache, value_cache: (num_blocks, block_size, Nkv, H), written at slot(b, p) only
// cum: (B+1,), past: (B,), block_table: (B, max_blocks), all int32
// fault: the metadata guard's (B+1,) int32 verdict, or nullptr: nothing runs when fault[B] != 0,
// and the tokens of a sequence with fault[b] != 0 are skipped (no q_out row, no K/V write).
// cos_cache, sin_cache: (cos_rows, R/2) (unused without rotary); q_out: (T, N, H)
// Without the guard, a token whose position has no cos/sin row gets NaN in q_out and writes no
// K/V, and the cursor and PagedKV::slot stay inside their arrays for any cum/past/table values:
// wrong input never turns into an access outside an array.
template <typename T>
__device__ __forceinline__ void run(
    const T* __restrict__ query, const T* __restrict__ key, const T* __restrict__ value,
    T* __restrict__ key_cache, T* __restrict__ value_cache, const int* __restrict__ cum,
    const int* __restrict__ past, const int* __restrict__ block_table,
    const int* __restrict__ fault, const T* __restrict__ cos_cache,
    const T* __restrict__ sin_cache, T* __restrict__ q_out,
    int num_tokens, int batch, int num_heads, int kv_heads, int head_size, int block_size,
    int num_blocks, int max_blocks, int rotary_dim, int cos_rows, int packed, int do_rotary,
    int interleaved, int write_q) {
  if (batch <= 0 || guard::batch_faulted(fault, batch)) return;
  const PagedKV<T> kv{key_cache, value_cache, block_table, num_blocks, block_size, kv_heads,
                      head_size, max_blocks};
  const int chunks = head_size / 8;
  const int q_heads = write_q ? num_heads : 0;
  const int slots = q_heads + 2 * kv_heads;
  const long long q_width = static_cast<long long>(num_heads) * head_size;
  const long long kv_width = static_cast<long long>(kv_heads) * head_size;
  const long long packed_width = q_width + 2 * kv_width;
  const long long items = static_cast<long long>(num_tokens) * slots * chunks;
  const int half = rotary_dim / 2;
  SequenceCursor seq(cum, batch);

  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int c0 = static_cast<int>(i % chunks) * 8;
    const long long ts = i / chunks;
    const int s = static_cast<int>(ts % slots);
    const long long t = ts / slots;
    const int b = seq.seek(t);
    if (guard::sequence_faulted(fault, b)) continue;
    const long long p = past[b] + (t - seq.begin);  // absolute position of token t

    // role 0: Q head h, 1: K head h, 2: V head h; `head` points at its H input channels.
    const int role = s < q_heads ? 0 : s < q_heads + kv_heads ? 1 : 2;
    const int h = role == 0 ? s : role == 1 ? s - q_heads : s - q_heads - kv_heads;
    const T* head;
    if (packed) {
      const int column = role == 0 ? h : role == 1 ? num_heads + h : num_heads + kv_heads + h;
      head = query + t * packed_width + static_cast<long long>(column) * head_size;
    } else {
      const T* rows = role == 0 ? query : role == 1 ? key : value;
      head = rows + t * (role == 0 ? q_width : kv_width) + static_cast<long long>(h) * head_size;
    }

    const bool has_cos = !do_rotary || (p >= 0 && p < cos_rows);
    Vec8<T> x = Vec8<T>::load(head + c0);
    if (do_rotary && has_cos && role != 2 && c0 < rotary_dim) {  // V and channels >= R: copied
      float y[8];
      x.to_float(y);
      rotate_chunk8(y, head, c0, rotary_dim, interleaved != 0, cos_cache + p * half,
                    sin_cache + p * half);
      x = Vec8<T>::from_float(y);
    }
    if (role == 0) {
      if (!has_cos) x = Vec8<T>::fill(__int_as_float(0x7fc00000));  // quiet NaN
      x.store(q_out + (t * num_heads + h) * head_size + c0);
    } else if (has_cos) {
      const long long slot = kv.slot(b, p);
      if (slot >= 0) x.store((role == 1 ? key_cache : value_cache) + slot + h * head_size + c0);
    }
  }
}

}  // namespace prologue
}  // namespace cupy_paged
