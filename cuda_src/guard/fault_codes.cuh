// The metadata guard's vocabulary, shared by the guard kernel and every kernel that reads its
// verdict: the fault bits of fault[b] / fault[B], the layout of the per-stream scratch and of
// the per-device error word. cupy_paged/backends/_guard.py mirrors every number here.
#pragma once

namespace cupy_paged {
namespace guard {

// Fault bits, in the order _validate.check_metadata checks them (bit k = rank k): the error
// word reports the lowest-ranked kind of the first faulting call, at its lowest sequence.
// Batch faults (the row -> sequence map or a batch-wide bound is broken) go to fault[B]; the
// others to fault[b] of the sequence.
enum FaultBit : int {
  FAULT_CUM_START = 1 << 0,      // cumulative_sequence_length[0] != 0                (batch)
  FAULT_CUM_END = 1 << 1,        // cumulative_sequence_length[B] != T                (batch)
  FAULT_CUM_ORDER = 1 << 2,      // cumulative_sequence_length[b] > [b + 1]           (batch)
  FAULT_PAST = 1 << 3,           // past_seqlens[b] < 0
  FAULT_BLOCK_ID = 1 << 4,       // a block id outside [-1, num_blocks) in a used column
  FAULT_CAPACITY = 1 << 5,       // q_len > 0 and past + q_len > max_blocks * block_size
  FAULT_MAX_SEQLEN_Q = 1 << 6,   // q_len > the caller's max_seqlen_q
  FAULT_MAX_SEQLEN_K = 1 << 7,   // past + q_len > the caller's max_seqlen_k
  FAULT_TOTAL_KV = 1 << 8,       // sum of past + q_len > the caller's total_kv_tokens  (batch)
  FAULT_ROTARY = 1 << 9,         // do_rotary, q_len > 0 and past + q_len > cos rows
};
constexpr int kFaultKinds = 10;
constexpr int kBatchFaults = FAULT_CUM_START | FAULT_CUM_END | FAULT_CUM_ORDER | FAULT_TOTAL_KV;

// Per-(device, stream) scratch, unsigned long long[kScratchSize]: one call's running state,
// put back to its initial value (zeros, slots all ones) by the call's last block.
enum ScratchIndex : int {
  SCRATCH_DONE = 0,      // blocks finished
  SCRATCH_BITS = 1,      // OR of every fault bit of the call
  SCRATCH_FAULTED = 2,   // sequences with fault[b] != 0
  SCRATCH_TOTAL = 3,     // sum of past + q_len (two's complement), when total_kv_tokens is given
  SCRATCH_SLOTS = 4,     // 2 per kind, as in the error word
};
constexpr int kScratchSize = SCRATCH_SLOTS + 2 * kFaultKinds;

// Per-device error word, unsigned long long[kWordSize]; zeros (slots all ones) when clean.
// Slot pair k (kind k) of the first faulting call since the last check:
//   [WORD_SLOTS + 2k] = seq << 32 | uint32(v1), [WORD_SLOTS + 2k + 1] = seq << 32 | uint32(v2)
// kept with atomicMin, so within a call the lowest sequence wins; v1 and v2 are int32
// (saturated) values of the fault, see _guard.py for what each kind records.
enum WordIndex : int {
  WORD_SEEN = 0,         // OR of the fault bits of every faulting call (sticky)
  WORD_SEQUENCES = 1,    // faulted sequences, summed over calls (B for a batch fault)
  WORD_CALLS = 2,        // faulting calls
  WORD_CLAIMED = 3,      // 1 once a call has copied its slots in
  WORD_SLOTS = 4,
};
constexpr int kWordSize = WORD_SLOTS + 2 * kFaultKinds;

// The verdict as the attention kernels read it: fault is the guard's int32 (B + 1,) array, or
// nullptr when no guard ran (direct launcher calls).
__device__ __forceinline__ bool batch_faulted(const int* fault, int batch) {
  return fault != nullptr && fault[batch] != 0;
}
__device__ __forceinline__ bool sequence_faulted(const int* fault, long long b) {
  return fault != nullptr && fault[b] != 0;
}

}  // namespace guard
}  // namespace cupy_paged
