// Which sequence a packed row belongs to: binary search of a (B+1,) int32 prefix array
// (cumulative_sequence_length for query rows, seqstart_k for gathered key rows). Empty sequences
// (equal neighbours) are never returned; there is no batch-size limit.
#pragma once

namespace cupy_paged {

// The b in [0, batch) with start(b) <= x < start(b + 1), for a non-decreasing start(.) with
// start(0) <= x < start(batch) (start(batch) is never evaluated). Invariant: start(lo) <= x <
// start(hi); when hi = lo + 1 the sequence lo holds x, so it is not empty. ceil(log2(B))
// evaluations. For any start(.) it still returns some b in [0, batch): never an index outside.
template <class Start>
__device__ __forceinline__ int search_sequence(int batch, long long x, Start start) {
  int lo = 0, hi = batch;
  while (hi - lo > 1) {
    const int mid = lo + (hi - lo) / 2;
    if (start(mid) <= x) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The b with starts[b] <= row < starts[b+1] of a prefix array; its loads are all cached after
// the first warp.
__device__ __forceinline__ int sequence_of_row(const int* starts, int batch, long long row) {
  return search_sequence(batch, row, [starts](int b) { return starts[b]; });
}

// sequence_of_row, trying sequence `guess` first (two loads, issued together): for a guess of
// row * B / rows, exact for batches of equal lengths (every decode step), the usual chain of
// ceil(log2(B)) dependent loads becomes one round trip. Any guess gives a correct answer.
__device__ __forceinline__ int sequence_of_row_from(const int* starts, int batch, long long row,
                                                    int guess) {
  if (0 <= guess && guess < batch && starts[guess] <= row && row < starts[guess + 1]) {
    return guess;
  }
  return sequence_of_row(starts, batch, row);
}

// A grid-stride loop visits rows in increasing order, many in a row from one sequence: remember
// the last sequence's range [begin, end) and search again only when a row leaves it.
struct SequenceCursor {
  const int* starts;  // (B+1,)
  int batch;
  int b = 0;
  long long begin = 0, end = 0;  // rows of sequence b; empty until the first seek

  __device__ SequenceCursor(const int* starts_, int batch_) : starts(starts_), batch(batch_) {}

  __device__ __forceinline__ int seek(long long row) {
    if (row < begin || row >= end) {
      b = sequence_of_row(starts, batch, row);
      begin = starts[b];
      end = starts[b + 1];
    }
    return b;
  }
};

}  // namespace cupy_paged
