// Parameters of the metadata guard kernel, passed by value as one struct; the only description
// (cupy_paged/backends/_params.py parses it; format in flash/params.cuh).
#pragma once

namespace cupy_paged {
namespace guard {

struct GuardParams {
  const int* cum;                // (B+1,)
  const int* past;               // (B,)
  const int* block_table;        // (B, max_blocks)
  int* fault;                    // (B+1,) verdict, written
  void* out;                     // (T, N*H) 16-bit output: faulted rows become NaN
  unsigned long long* scratch;   // kScratchSize, this stream's running state
  unsigned long long* word;      // kWordSize, the device's error word
  long long num_tokens;
  int batch;
  long long row_chunks;          // 16-byte chunks per output row (N*H / 8)
  int block_size;
  int num_blocks;
  int max_blocks;
  long long cos_rows;            // -1: no rotary
  long long max_seqlen_q;        // -1: no bound given
  long long max_seqlen_k;
  long long total_kv_tokens;
};

}  // namespace guard
}  // namespace cupy_paged
