// Parameters of the flash kernels, each passed by value as one struct. This definition is the
// only description: cupy_paged/backends/_params.py parses it into the launch's NumPy mirror.
// Format: one field per line, pointer fields first (filled per call), then the scalars
// (packed once per plan); types: pointers, int, unsigned, float, long long.
#pragma once

namespace cupy_paged {
namespace flash {

struct FwdParams {
  const void* q;            // (T, N*H), rotated
  const void* key_cache;    // (num_blocks, block_size, Nkv, H)
  const void* value_cache;  // (num_blocks, block_size, Nkv, H)
  const int* cum;           // (B+1,)
  const int* past;          // (B,)
  const int* block_table;   // (B, max_blocks), -1 = unmapped
  void* out;                // (T, N*H), written when num_splits == 1
  float* partial_o;         // (num_splits, T*N, H), normalised per split (num_splits > 1)
  float* partial_lse;       // (num_splits, T*N), log2 of each split's row sum (-inf: no key)
  const int* fault;         // null, or the metadata guard's (B+1,) flags (backends/_guard.py)
  const void* head_sink;    // null, or (N,) in T: each query head's sink logit (num_splits 1)
  int* work_counter;        // a persistent sm90a grid's (2,) unit counter, 0 between launches
                            // (hopper/producer.cuh's run_all); null otherwise
  int num_tokens;
  int batch;
  int num_heads;
  int kv_heads;
  int head_size;
  int group;                // G = N / Nkv
  int block_size;           // BlockDiv: size, shift (-1: not a power of two), magic, shift
  int block_shift;
  unsigned block_magic;
  int block_magic_shift;
  int num_blocks;
  int max_blocks;
  float scale_log2;         // scale * log2(e) (softcap off)
  float cap_in;             // scale / c; 0: softcap off
  float cap_out;            // c * log2(e)
  int window;               // <= 0: off
  int num_splits;
  int num_work;             // work units (tiles x kv heads): the grid's x, or what a
                            // persistent grid's CTAs walk (hopper/fwd_kernel.cuh)
};

struct CombineParams {
  const float* partial_o;   // (num_splits, rows, H)
  const float* partial_lse; // (num_splits, rows)
  void* out;                // (rows, H) = (T, N*H)
  const int* fault;         // null, or the guard's (batch+1,) flags
  const void* head_sink;    // null, or (N,) in T: each query head's sink logit
  int rows;
  int head_size;
  int num_splits;
  int batch;
  int num_heads;            // N: row r's head is r % N
};

}  // namespace flash
}  // namespace cupy_paged
