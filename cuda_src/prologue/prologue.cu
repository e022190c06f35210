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

// Token-major: block x walks tokens t = x, x + gridDim.x, ... (increasing, so the sequence
// cursor rarely searches); per token, the sequence, position, fault flag and cache slot are
// found once for the block, and its threads move the token's (head slot s, chunk c) 16-byte
// items, consecutive threads on consecutive 16 bytes of a row. The item index needs one 32-bit
// division; 64-bit arithmetic stays on offsets. Head slots: [0, q_heads) are Q heads (only when
// write_q: packed or rotary input; otherwise the caller attends with query itself), then Nkv K
// heads, then Nkv V heads.
//
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
  const int items = slots * chunks;  // per token, <= (256 + 2 * 256) * 32
  const int half = rotary_dim / 2;
  SequenceCursor seq(cum, batch);

  for (long long t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    const int b = seq.seek(t);
    if (guard::sequence_faulted(fault, b)) continue;
    const long long p = past[b] + (t - seq.begin);  // absolute position of token t
    const bool has_cos = !do_rotary || (p >= 0 && p < cos_rows);
    const long long slot = has_cos ? kv.slot(b, p) : -1;  // -1: no K/V write
    for (int k = threadIdx.x; k < items; k += blockDim.x) {
      const int s = k / chunks;
      const int c0 = (k - s * chunks) * 8;
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
      if (role != 0 && slot < 0) continue;  // nothing to write
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
      } else {
        x.store((role == 1 ? key_cache : value_cache) + slot + h * head_size + c0);
      }
    }
  }
}

}  // namespace prologue
}  // namespace cupy_paged
