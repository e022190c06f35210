// Parameters of the mea backend's kernels (the gather and the paged fMHA), each passed by value
// as one struct; the only description (cupy_paged/backends/_params.py parses it; format in
// flash/params.cuh).
#pragma once

namespace cupy_paged {
namespace mea {

struct GatherParams {
  const void* key_cache;    // (num_blocks, block_size, Nkv, H)
  const void* value_cache;
  const int* block_table;   // (B, max_blocks)
  const int* seqstart_k;    // (B+1,)
  const int* fault;         // null, or the guard's (B+1,) flags
  void* k_packed;           // (rows_bound, Nkv, H)
  void* v_packed;
  int batch;
  int kv_heads;
  int head_size;
  int block_size;
  int num_blocks;
  int max_blocks;
  int rows_bound;
};

struct FmhaParams {
  const void* q;            // (T, N, H) rows, row stride q_row_stride elements
  const void* k_packed;     // (kv_rows, Nkv, H)
  const void* v_packed;
  void* out;                // (T, N*H)
  float* out_accum;         // (T, N, H) float32, or null (H <= 128)
  const int* cu_q;          // (B+1,)
  const int* cu_k;          // (B+1,)
  const int* block_table;   // (B, max_blocks)
  const int* fault;         // null, or the guard's (B+1,) flags
  long long q_row_stride;
  int max_blocks;
  int block_size;
  int num_heads;
  int kv_num_heads;
  int head_size;
  float scale;
  float softcap;            // <= 0: off
  int window;               // <= 0: off
  long long num_tokens;     // rows of q and out
  long long kv_rows;        // rows of k_packed and v_packed
};

}  // namespace mea
}  // namespace cupy_paged
