// Parameters of the prologue kernel, passed by value as one struct; the only description
// (cupy_paged/backends/_params.py parses it; format in flash/params.cuh).
#pragma once

namespace cupy_paged {
namespace prologue {

struct PrologueParams {
  const void* query;        // (T, N*H), or packed (T, (N + 2*Nkv)*H)
  const void* key;          // (T, Nkv*H) (unused when packed)
  const void* value;        // (T, Nkv*H) (unused when packed)
  void* key_cache;          // (num_blocks, block_size, Nkv, H)
  void* value_cache;        // (num_blocks, block_size, Nkv, H)
  const int* cum;           // (B+1,)
  const int* past;          // (B,)
  const int* block_table;   // (B, max_blocks)
  const int* fault;         // null, or the guard's (B+1,) flags
  const void* cos_cache;    // (cos_rows, R/2) (unused without rotary)
  const void* sin_cache;    // (cos_rows, R/2)
  void* q_out;              // (T, N*H), written when write_q
  int num_tokens;
  int batch;
  int num_heads;
  int kv_heads;
  int head_size;
  int block_size;
  int num_blocks;
  int max_blocks;
  int rotary_dim;
  int cos_rows;
  int packed;
  int do_rotary;
  int interleaved;
  int write_q;
};

}  // namespace prologue
}  // namespace cupy_paged
