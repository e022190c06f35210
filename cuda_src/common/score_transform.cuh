// Raw q.k dot products -> the logits the softmax exponentiates, in the contract's order: scale,
// then the optional softcap c * tanh(s / c). Logits are in base 2 (log2(e) folded into the
// factors), the convention of common/softmax_state.cuh.
#pragma once
#include "common/fast_math.cuh"

namespace cupy_paged {

constexpr float kLog2e = 1.4426950408889634f;

// tanh(x) = 1 - 2 / (1 + e^{2x}): absolute error ~1e-7 (what a softmax logit needs; the
// tanh.approx instruction's 2^-11 would shift c = 50 logits by ~0.03). Saturates to +-1.
__device__ __forceinline__ float tanh_exp(float x) {
  const float e = fast_exp2(x * 2.8853900817779268f);  // 2 log2(e)
  return 1.0f - 2.0f * fast_rcp(1.0f + e);  // 1 / inf = 0: x -> +inf gives 1
}

// The launch's transform. Softcap off: logit = s * scale_log2 (a kernel may fold that product
// into its exponent). Softcap c > 0: logit = c tanh(scale s / c) log2(e).
struct ScoreTransform {
  float scale_log2;  // scale * log2(e)
  float cap_in;      // scale / c
  float cap_out;     // c * log2(e)
  bool capped;       // c > 0

  __device__ __forceinline__ static ScoreTransform make(float scale, float softcap) {
    const bool capped = softcap > 0.0f;
    return {scale * kLog2e, capped ? scale / softcap : 0.0f, capped ? softcap * kLog2e : 0.0f,
            capped};
  }
  __device__ __forceinline__ float plain(float s) const { return s * scale_log2; }
  __device__ __forceinline__ float softcapped(float s) const {
    return tanh_exp(s * cap_in) * cap_out;
  }
};

}  // namespace cupy_paged
