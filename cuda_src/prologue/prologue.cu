// The attention prologue (spec steps 1-3) in one pass over (new token, head, 8-channel chunk):
// split packed QKV, rotate Q and K in float32 at the token's absolute position, write Q to q_out
// and K, V into the paged cache. cupy_paged/backends/_prologue.py generates the extern "C" entries.
#pragma once
#include "common/dtypes.cuh"
#include "common/paged_kv.cuh"
#include "common/pdl.cuh"
#include "common/rotary.cuh"
#include "common/seq_lookup.cuh"
#include "guard/fault_codes.cuh"
#include "prologue/params.cuh"

namespace cupy_paged {
namespace prologue {

// Token-major: block x takes kTokens consecutive tokens at a time (t0 = x kTokens, then
// + gridDim.x kTokens, ...). Per token, one thread finds the sequence, position, fault flag and
// cache slot and shares them; then the block's threads move the tokens' (head slot s, chunk c)
// 16-byte items, consecutive threads on consecutive 16 bytes of a row, with the kTokens loads
// of an item in flight together. (A version that let every thread redo each token's lookup,
// 64-bit divisions included, for one 16-byte item, issued ~230 instructions per store and
// reached a third of the DRAM bandwidth.) Head slots: [0, q_heads) are Q heads (only when
// write_q: packed or rotary input; otherwise the caller attends with query itself), then Nkv
// K heads, then Nkv V heads.
//
// query: (T, N*H), or packed (T, (N + 2*Nkv)*H) = [Q heads | K heads | V heads]
// key, value: (T, Nkv*H) each (unused when packed)
// key_cache, value_cache: (num_blocks, block_size, Nkv, H), written at slot(b, p) only
// cum: (B+1,), past: (B,), block_table: (B, max_blocks), all int32
// fault: the metadata guard's (B+1,) int32 verdict, or nullptr: nothing is written when
// fault[B] != 0, and the tokens of a sequence with fault[b] != 0 are skipped (no q_out row, no
// K/V write).
// cos_cache, sin_cache: (cos_rows, R/2) (unused without rotary); q_out: (T, N, H)
// May be launched programmatically after the guard (common/pdl.cuh; the flash backend's plan
// decides): the lookups and the first input loads go out while the guard runs (the guard
// starts after every earlier kernel on the stream has completed, so the inputs are final);
// fault is read, and anything written, only after the wait, which also lets the forward
// kernel start.
// Without the guard, a token whose position has no cos/sin row gets NaN in q_out and writes no
// K/V, and the sequence search and PagedKV::slot stay inside their arrays for any
// cum/past/table values: wrong input never turns into an access outside an array.
constexpr int kTokens = 4;

template <typename T>
__device__ __forceinline__ void run(const PrologueParams& p) {
  const T* __restrict__ query = static_cast<const T*>(p.query);
  const T* __restrict__ key = static_cast<const T*>(p.key);
  const T* __restrict__ value = static_cast<const T*>(p.value);
  T* __restrict__ key_cache = static_cast<T*>(p.key_cache);
  T* __restrict__ value_cache = static_cast<T*>(p.value_cache);
  const int* __restrict__ cum = p.cum;
  const int* __restrict__ past = p.past;
  const int* __restrict__ block_table = p.block_table;
  const int* __restrict__ fault = p.fault;
  const T* __restrict__ cos_cache = static_cast<const T*>(p.cos_cache);
  const T* __restrict__ sin_cache = static_cast<const T*>(p.sin_cache);
  T* __restrict__ q_out = static_cast<T*>(p.q_out);
  const int num_tokens = p.num_tokens, batch = p.batch, num_heads = p.num_heads,
            kv_heads = p.kv_heads, head_size = p.head_size, block_size = p.block_size,
            num_blocks = p.num_blocks, max_blocks = p.max_blocks, rotary_dim = p.rotary_dim,
            cos_rows = p.cos_rows, packed = p.packed, do_rotary = p.do_rotary,
            interleaved = p.interleaved, write_q = p.write_q;
  if (batch <= 0) {
    pdl::wait();
    return;
  }
  const PagedKV<T> kv{key_cache, value_cache, block_table, num_blocks, max_blocks,
                      kv_heads * head_size, BlockDiv::of(block_size)};
  const int chunks = head_size / 8;
  const int q_heads = write_q ? num_heads : 0;
  const int slots = q_heads + 2 * kv_heads;
  const long long q_width = static_cast<long long>(num_heads) * head_size;
  const long long kv_width = static_cast<long long>(kv_heads) * head_size;
  const long long packed_width = q_width + 2 * kv_width;
  const int items = slots * chunks;  // per token
  const int half = rotary_dim / 2;

  // Item k of a token: head slot s = k / chunks, channels [c0, c0 + 8); role 0: Q head h,
  // 1: K head h, 2: V head h; `head` points at its H input channels in token t0's row, and
  // token t0 + u's are u * stride further.
  struct Item {
    int role, h, c0;
    const T* head;
    long long stride;
  };
  auto item = [&](int k, long long t0) {
    Item it;
    const int s = k / chunks;
    it.c0 = (k - s * chunks) * 8;
    it.role = s < q_heads ? 0 : s < q_heads + kv_heads ? 1 : 2;
    it.h = it.role == 0 ? s : it.role == 1 ? s - q_heads : s - q_heads - kv_heads;
    if (packed) {
      const int column = it.role == 0 ? it.h
                         : it.role == 1 ? num_heads + it.h
                                        : num_heads + kv_heads + it.h;
      it.stride = packed_width;
      it.head = query + t0 * packed_width + static_cast<long long>(column) * head_size;
    } else {
      const T* rows = it.role == 0 ? query : it.role == 1 ? key : value;
      it.stride = it.role == 0 ? q_width : kv_width;
      it.head = rows + t0 * it.stride + static_cast<long long>(it.h) * head_size;
    }
    return it;
  };

  // Per token u of the block's current group, found by thread u (one sequence search and one
  // table lookup per token, not per thread): position, cache slot (-1: no K/V write) and flags.
  __shared__ long long s_pos[kTokens], s_slot[kTokens];
  __shared__ int s_flags[kTokens];  // bit 0: skipped (past the end, or a fault); bit 1: cos row
  for (long long t0 = static_cast<long long>(blockIdx.x) * kTokens; t0 < num_tokens;
       t0 += static_cast<long long>(gridDim.x) * kTokens) {
    const int n_tok = static_cast<int>(min(static_cast<long long>(kTokens), num_tokens - t0));
    int b = 0;
    long long pos = 0;
    if (threadIdx.x < n_tok) {
      const long long t = t0 + threadIdx.x;
      // Guessing row * B / T, exact for equal lengths (every decode step): one round trip.
      // With a batch fault cum may be anything; the search still stays inside its arrays.
      b = sequence_of_row_from(cum, batch, t, static_cast<int>(t * batch / num_tokens));
      pos = past[b] + (t - cum[b]);  // absolute position of token t
    }
    // The first item's loads go out before the lookups are waited for (they need none).
    int k = threadIdx.x;
    Item it = item(k, t0);
    Vec8<T> x[kTokens];
    if (k < items) {
#pragma unroll
      for (int u = 0; u < kTokens; ++u)
        if (u < n_tok) x[u] = Vec8<T>::load(it.head + u * it.stride + it.c0);
    }
    pdl::wait();  // the guard's verdict (a no-op after the first group)
    pdl::launch_dependents();
    if (threadIdx.x < n_tok) {
      const bool has_cos = !do_rotary || (pos >= 0 && pos < cos_rows);
      const bool skip = guard::batch_faulted(fault, batch) || guard::sequence_faulted(fault, b);
      s_pos[threadIdx.x] = pos;
      s_slot[threadIdx.x] = !skip && has_cos ? kv.slot(b, pos) : -1;
      s_flags[threadIdx.x] = (skip ? 1 : 0) | (has_cos ? 2 : 0);
    }
    __syncthreads();
    while (k < items) {
#pragma unroll
      for (int u = 0; u < kTokens; ++u) {
        // The lookups stay in shared memory (broadcast reads): in registers they cost the
        // occupancy that hides this loop's latency.
        const int flags = s_flags[u];
        const long long slot = s_slot[u];
        if (u >= n_tok || (flags & 1) != 0 || (it.role != 0 && slot < 0)) continue;  // no write
        const bool has_cos = (flags & 2) != 0;
        if (do_rotary && has_cos && it.role != 2 && it.c0 < rotary_dim) {  // V, >= R: copied
          float y[8];
          x[u].to_float(y);
          const long long pos = s_pos[u];
          rotate_chunk8(y, it.head + u * it.stride, it.c0, rotary_dim, interleaved != 0,
                        cos_cache + pos * half, sin_cache + pos * half);
          x[u] = Vec8<T>::from_float(y);
        }
        if (it.role == 0) {
          if (!has_cos) x[u] = Vec8<T>::fill(__int_as_float(0x7fc00000));  // quiet NaN
          x[u].store(q_out + ((t0 + u) * num_heads + it.h) * head_size + it.c0);
        } else {
          x[u].store((it.role == 1 ? key_cache : value_cache) + slot + it.h * head_size +
                     it.c0);
        }
      }
      k += blockDim.x;
      if (k < items) {
        it = item(k, t0);
#pragma unroll
        for (int u = 0; u < kTokens; ++u)
          if (u < n_tok) x[u] = Vec8<T>::load(it.head + u * it.stride + it.c0);
      }
    }
    __syncthreads();  // every thread is done with the lookups before the next group's
  }
  pdl::wait();  // a block with no group (none today) still waits before it exits
}

}  // namespace prologue
}  // namespace cupy_paged
