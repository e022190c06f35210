// The metadata guard: one launch before the prologue, one warp per sequence, that flags every
// sequence whose metadata would send a kernel outside its arrays (fault[b]; the whole batch:
// fault[B]), fills those sequences' output rows with NaN and records the first faulting call in
// the device's error word. cupy_paged/backends/_guard.py generates the extern "C" entry.
#pragma once
#include "common/pdl.cuh"
#include "guard/fault_codes.cuh"
#include "guard/params.cuh"

namespace cupy_paged {
namespace guard {

constexpr int kWarps = 4;  // sequences in flight per block (one warp each)
constexpr int kThreads = kWarps * 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kNoColumn = 0x7fffffff;

__device__ __forceinline__ unsigned saturate_i32(long long v) {
  return static_cast<unsigned>(static_cast<int>(
      v < -2147483648LL ? -2147483648LL : v > 2147483647LL ? 2147483647LL : v));
}

// Slot pair of `kind` in `slots`: the lowest sequence wins (each (kind, seq) is recorded once
// per call, so v1 and v2 of the winner belong together).
__device__ __forceinline__ void record(unsigned long long* slots, int bit, long long seq,
                                       long long v1, long long v2) {
  const int kind = __ffs(bit) - 1;
  const unsigned long long key = static_cast<unsigned long long>(seq) << 32;
  atomicMin(slots + 2 * kind, key | saturate_i32(v1));
  atomicMin(slots + 2 * kind + 1, key | saturate_i32(v2));
}

// NaN (0x7fff: a quiet NaN in fp16 and bf16) into 16-byte chunks [begin, end) of out,
// `lane` of `lanes` threads.
__device__ __forceinline__ void fill_nan(uint4* out, long long begin, long long end, int lane,
                                         int lanes) {
  const uint4 nan = make_uint4(0x7fff7fffu, 0x7fff7fffu, 0x7fff7fffu, 0x7fff7fffu);
  for (long long i = begin + lane; i < end; i += lanes) out[i] = nan;
}

// Loads in flight per lane while a warp scans a block-table row: a 32k-token sequence at
// block 16 has 2048 columns, scanned in 4 dependent steps of 512 instead of 16 of 128.
constexpr int kScanLoads = 16;

// The first column in [0, cols) of `row` holding an id outside [-1, num_blocks), or kNoColumn;
// the whole warp scans, kScanLoads coalesced 128-byte loads in flight per step.
__device__ __forceinline__ int first_bad_column(const int* row, int cols, int num_blocks,
                                                int lane) {
  int bad = kNoColumn;
  for (int c0 = 0; c0 < cols; c0 += kScanLoads * 32) {
    int id[kScanLoads];
#pragma unroll
    for (int u = 0; u < kScanLoads; ++u) {
      const int c = c0 + u * 32 + lane;
      id[u] = c < cols ? row[c] : -1;
    }
#pragma unroll
    for (int u = 0; u < kScanLoads; ++u) {
      if ((id[u] < -1 || id[u] >= num_blocks) && bad == kNoColumn) bad = c0 + u * 32 + lane;
    }
    if (__any_sync(kFullMask, bad != kNoColumn)) break;  // the lowest bad column is in this step
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    bad = min(bad, __shfl_xor_sync(kFullMask, bad, offset));
  }
  return bad;
}

// cum: (B+1,), past: (B,), block_table: (B, max_blocks), all int32, any values.
// fault: (B+1,) int32, written: fault[b] = the sequence's bits, fault[B] = the batch's bits.
// out: (T, N*H) 16-bit rows as 16-byte chunks, row_chunks = N*H/8 per row; faulted rows
// become NaN. scratch: this stream's kScratchSize state; word: this device's error word.
// cos_rows, max_seqlen_q, max_seqlen_k, total_kv_tokens: < 0 when off (no rotary, no hint).
// 64-bit arithmetic throughout: past + q_len, block_table offsets and row chunks never wrap.
__device__ __forceinline__ void run(const GuardParams& p) {
  const int* __restrict__ cum = p.cum;
  const int* __restrict__ past = p.past;
  const int* __restrict__ block_table = p.block_table;
  int* __restrict__ fault = p.fault;
  uint4* __restrict__ out = static_cast<uint4*>(p.out);
  unsigned long long* scratch = p.scratch;
  unsigned long long* word = p.word;
  const long long num_tokens = p.num_tokens, row_chunks = p.row_chunks, cos_rows = p.cos_rows;
  const int batch = p.batch, block_size = p.block_size, num_blocks = p.num_blocks,
            max_blocks = p.max_blocks;
  const long long max_seqlen_q = p.max_seqlen_q, max_seqlen_k = p.max_seqlen_k,
                  total_kv_tokens = p.total_kv_tokens;
  __shared__ int s_last;
  __shared__ int s_batch_bits;
  // The prologue (launched programmatically) may start now: until its wait it reads only the
  // call's inputs, which this kernel does not write.
  pdl::launch_dependents();
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  unsigned long long* slots = scratch + SCRATCH_SLOTS;
  const long long capacity = static_cast<long long>(max_blocks) * block_size;

  for (long long b = static_cast<long long>(blockIdx.x) * kWarps + warp; b < batch;
       b += static_cast<long long>(gridDim.x) * kWarps) {
    const long long q0 = cum[b], q1 = cum[b + 1], q_len = q1 - q0;
    const long long p = past[b], end = p + q_len;  // end: one past the last new position
    int bits = 0;
    if (p < 0) bits |= FAULT_PAST;
    if (q_len > 0 && end > capacity) bits |= FAULT_CAPACITY;
    if (max_seqlen_q >= 0 && q_len > max_seqlen_q) bits |= FAULT_MAX_SEQLEN_Q;
    if (max_seqlen_k >= 0 && end > max_seqlen_k) bits |= FAULT_MAX_SEQLEN_K;
    if (cos_rows >= 0 && q_len > 0 && end > cos_rows) bits |= FAULT_ROTARY;
    // Columns the sequence uses: those of positions [0, end), as far as the table goes.
    const long long need = end > 0 ? (end - 1) / block_size + 1 : 0;
    const int cols = static_cast<int>(need < max_blocks ? need : max_blocks);
    const int* row = block_table + b * max_blocks;
    const int bad_col = first_bad_column(row, cols, num_blocks, lane);
    if (bad_col != kNoColumn) bits |= FAULT_BLOCK_ID;

    if (lane == 0) {
      fault[b] = bits;
      int call_bits = bits;
      if (q0 > q1) {
        call_bits |= FAULT_CUM_ORDER;
        record(slots, FAULT_CUM_ORDER, b, q0, q1);
      }
      if (total_kv_tokens >= 0) {
        atomicAdd(scratch + SCRATCH_TOTAL, static_cast<unsigned long long>(end));
      }
      if (bits != 0) {
        atomicAdd(scratch + SCRATCH_FAULTED, 1ull);
        if (bits & FAULT_PAST) record(slots, FAULT_PAST, b, p, q_len);
        if (bits & FAULT_BLOCK_ID) record(slots, FAULT_BLOCK_ID, b, bad_col, row[bad_col]);
        if (bits & FAULT_CAPACITY) record(slots, FAULT_CAPACITY, b, p, q_len);
        if (bits & FAULT_MAX_SEQLEN_Q) record(slots, FAULT_MAX_SEQLEN_Q, b, q_len, max_seqlen_q);
        if (bits & FAULT_MAX_SEQLEN_K) record(slots, FAULT_MAX_SEQLEN_K, b, end, max_seqlen_k);
        if (bits & FAULT_ROTARY) record(slots, FAULT_ROTARY, b, end - 1, cos_rows);
      }
      if (call_bits != 0) atomicOr(scratch + SCRATCH_BITS, static_cast<unsigned long long>(call_bits));
    }
    // Rows of a faulted sequence, where its own cum range is sane (a batch fault NaNs all).
    if (bits != 0 && 0 <= q0 && q0 <= q1 && q1 <= num_tokens) {
      fill_nan(out, q0 * row_chunks, q1 * row_chunks, lane, 32);
    }
  }

  // The last block to finish sees every sequence's verdict (threadfence reduction, CUDA
  // Programming Guide B.5): it checks the batch-wide rules, publishes fault[B], reports to
  // the error word and resets the scratch for the stream's next call.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned long long done = atomicAdd(scratch + SCRATCH_DONE, 1ull);
    s_last = done == gridDim.x - 1;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if (threadIdx.x == 0) {
    volatile unsigned long long* state = scratch;
    int call_bits = static_cast<int>(state[SCRATCH_BITS]);
    const long long first = cum[0], last = cum[batch];
    if (first != 0) {
      call_bits |= FAULT_CUM_START;
      record(slots, FAULT_CUM_START, 0, first, 0);
    }
    if (last != num_tokens) {
      call_bits |= FAULT_CUM_END;
      record(slots, FAULT_CUM_END, batch, last, num_tokens);
    }
    if (total_kv_tokens >= 0) {
      const long long total = static_cast<long long>(state[SCRATCH_TOTAL]);
      if (total > total_kv_tokens) {
        call_bits |= FAULT_TOTAL_KV;
        record(slots, FAULT_TOTAL_KV, batch, total, total_kv_tokens);
      }
    }
    const int batch_bits = call_bits & kBatchFaults;
    fault[batch] = batch_bits;
    if (call_bits != 0) {
      atomicOr(word + WORD_SEEN, static_cast<unsigned long long>(call_bits));
      atomicAdd(word + WORD_SEQUENCES,
                batch_bits != 0 ? static_cast<unsigned long long>(batch) : state[SCRATCH_FAULTED]);
      atomicAdd(word + WORD_CALLS, 1ull);
      if (atomicCAS(word + WORD_CLAIMED, 0ull, 1ull) == 0ull) {
        for (int i = 0; i < 2 * kFaultKinds; ++i) word[WORD_SLOTS + i] = state[SCRATCH_SLOTS + i];
      }
    }
    for (int i = 0; i < SCRATCH_SLOTS; ++i) state[i] = 0ull;
    for (int i = 0; i < 2 * kFaultKinds; ++i) state[SCRATCH_SLOTS + i] = ~0ull;
    s_batch_bits = batch_bits;
  }
  __syncthreads();
  if (s_batch_bits != 0) fill_nan(out, 0, num_tokens * row_chunks, threadIdx.x, blockDim.x);
}

}  // namespace guard
}  // namespace cupy_paged
