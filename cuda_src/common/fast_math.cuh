// The special-function-unit approximations the softmax and the score transform are built on:
// one instruction each, on every arch cupy_paged builds for.
#pragma once

namespace cupy_paged {

// 2^x, ex2.approx.ftz: max relative error 2^-22, subnormal results flushed to 0; 2^-inf = +0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 1 / x, rcp.approx.ftz: ~1 ulp; 1 / inf = 0.
__device__ __forceinline__ float fast_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace cupy_paged
