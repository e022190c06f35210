// Rotary position embedding in float32 (spec step 2): which channel pairs with which, the
// rotation of one pair, and an 8-channel chunk of a head rotated in registers. Channels >= R
// pass through; GPT-NeoX pairs i with i + R/2, GPT-J pairs 2i with 2i + 1.
#pragma once
#include "common/dtypes.cuh"

namespace cupy_paged {

// Channel i < R of a head: its partner channel, the cos/sin column it uses, and the sign of the
// partner's term (-1 for the first channel of a pair, +1 for the second).
struct RotaryChannel {
  int partner;
  int freq;
  float sign;
};

__device__ __forceinline__ RotaryChannel rotary_channel(int i, int rotary_dim, bool interleaved) {
  if (interleaved) return {i ^ 1, i >> 1, (i & 1) ? 1.0f : -1.0f};
  const int half = rotary_dim / 2;
  return i < half ? RotaryChannel{i + half, i, -1.0f} : RotaryChannel{i - half, i - half, 1.0f};
}

// y = x cos + sign * (partner sin): first of a pair x cos - x' sin, second x cos + x' sin.
// Rounded products and sum with no FMA contraction: the same float32 operations as the NumPy
// reference (reference.apply_rotary), so results agree bit for bit on every arch.
__device__ __forceinline__ float rotate_pair(float x, float partner, float sign, float c, float s) {
  return __fadd_rn(__fmul_rn(x, c), sign * __fmul_rn(partner, s));
}

// Rotates y = channels [c0, c0 + 8) of `head` (already loaded, as float) in place, with cos/sin
// row `cos_row`, `sin_row` (R/2 entries each) of the token's position. c0 % 8 == 0, so GPT-J
// pairs never leave the chunk; GPT-NeoX partners sit R/2 away: one aligned 16-byte load when
// R/2 % 8 == 0 (then a chunk never straddles R/2 or R), else one scalar load per channel.
template <typename T>
__device__ __forceinline__ void rotate_chunk8(float (&y)[8], const T* head, int c0, int rotary_dim,
                                              bool interleaved, const T* cos_row,
                                              const T* sin_row) {
  if (c0 >= rotary_dim) return;
  const int half = rotary_dim / 2;
  float partner[8];
  if (interleaved) {
#pragma unroll
    for (int j = 0; j < 8; ++j) partner[j] = y[j ^ 1];
  } else if (half % 8 == 0) {
    Vec8<T>::load(head + (c0 < half ? c0 + half : c0 - half)).to_float(partner);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int i = c0 + j;
      partner[j] = i < rotary_dim ? to_float(head[i < half ? i + half : i - half]) : 0.0f;
    }
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int i = c0 + j;
    if (i < rotary_dim) {
      const RotaryChannel rc = rotary_channel(i, rotary_dim, interleaved);
      y[j] = rotate_pair(y[j], partner[j], rc.sign, to_float(cos_row[rc.freq]),
                         to_float(sin_row[rc.freq]));
    }
  }
}

}  // namespace cupy_paged
