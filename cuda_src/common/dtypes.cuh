// Element types of cupy_paged kernels, the one place for their conversions: float32 to and from
// __half, __nv_bfloat16 and float, pack2 (two floats into one register of 16-bit pairs), and
// Vec8, eight 16-bit elements moved as one 16-byte load/store (every row holds H channels with
// H % 8 == 0, so a head's channels split into whole, 16-byte aligned chunks of 8).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace cupy_paged {

// Whether T is __nv_bfloat16 (NVRTC has no <type_traits>).
template <typename T> struct IsBf16 { static constexpr bool value = false; };
template <> struct IsBf16<__nv_bfloat16> { static constexpr bool value = true; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even, as NumPy's float32 -> float16 cast (and ml_dtypes' -> bfloat16) does.
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats -> one 32-bit register of two 16-bit values (round-to-nearest-even), lo in the low
// half: the layout of an MMA fragment register and of two adjacent channels in memory.
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}
template <> __device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}

// Eight 16-bit elements in one 16-byte register quad. load/store need 16-byte aligned
// addresses: the launchers check every base pointer, and offsets are multiples of 8 elements.
template <typename T>
struct Vec8 {
  static_assert(sizeof(T) == 2, "Vec8 packs eight 16-bit elements into 16 bytes");
  uint4 raw;

  __device__ __forceinline__ static Vec8 load(const T* p) {
    return Vec8{*reinterpret_cast<const uint4*>(p)};
  }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<uint4*>(p) = raw; }
  __device__ __forceinline__ static Vec8 zero() { return Vec8{make_uint4(0u, 0u, 0u, 0u)}; }

  __device__ __forceinline__ T get(int j) const { return reinterpret_cast<const T*>(&raw)[j]; }
  __device__ __forceinline__ void set(int j, T x) { reinterpret_cast<T*>(&raw)[j] = x; }

  __device__ __forceinline__ void to_float(float (&y)[8]) const {
#pragma unroll
    for (int j = 0; j < 8; ++j) y[j] = cupy_paged::to_float(get(j));
  }
  __device__ __forceinline__ static Vec8 from_float(const float (&y)[8]) {
    Vec8 r;
#pragma unroll
    for (int j = 0; j < 8; ++j) r.set(j, cupy_paged::from_float<T>(y[j]));
    return r;
  }
  __device__ __forceinline__ static Vec8 fill(float x) {
    Vec8 r;
    const T e = cupy_paged::from_float<T>(x);
#pragma unroll
    for (int j = 0; j < 8; ++j) r.set(j, e);
    return r;
  }
};

}  // namespace cupy_paged
