// O += P V on one key tile: the probabilities, rounded to T, are the A fragments (the MMA's C
// layout is its A layout), against the warp's key slice of the V stage.
#pragma once
#include "common/dtypes.cuh"
#include "flash/mma.cuh"

namespace cupy_paged {
namespace flash {

// The probabilities are packed first, so the fp32 scores are dead during the MMAs; V fragments
// are loaded one step ahead. v_stage: the V lane address in the stage being computed
// (flash/qk_pipeline.cuh's FragmentLanes).
template <class Tr, int MF, int NF, int DF>
__device__ __forceinline__ void accumulate_pv(float (&o)[MF][DF][4], const float (&s)[MF][NF][4],
                                              unsigned v_stage) {
  using T = typename Tr::T;
  using L = typename Tr::Layout;
  constexpr int KK = Tr::WARP_KEYS / 16, DP = Tr::HEAD / 16, STEPS = KK * DP;
  unsigned pa[MF][KK][4];
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int kk = 0; kk < KK; ++kk) {
      pa[mf][kk][0] = pack2<T>(s[mf][2 * kk][0], s[mf][2 * kk][1]);
      pa[mf][kk][1] = pack2<T>(s[mf][2 * kk][2], s[mf][2 * kk][3]);
      pa[mf][kk][2] = pack2<T>(s[mf][2 * kk + 1][0], s[mf][2 * kk + 1][1]);
      pa[mf][kk][3] = pack2<T>(s[mf][2 * kk + 1][2], s[mf][2 * kk + 1][3]);
    }
  unsigned vf[2][4];
  ldmatrix_x4_trans(vf[0], v_stage);
#pragma unroll
  for (int step = 0; step < STEPS; ++step) {  // step = (kk, dp)
    const int kk = step / DP, dp = step % DP;
    if (step + 1 < STEPS) {
      const int kk1 = (step + 1) / DP, dp1 = (step + 1) % DP;
      ldmatrix_x4_trans(vf[(step + 1) & 1], L::step(v_stage + kk1 * 16 * Tr::ROW_BYTES, dp1));
    }
#pragma unroll
    for (int mf = 0; mf < MF; ++mf) {
      mma_16816<T>(o[mf][2 * dp], pa[mf][kk], vf[step & 1][0], vf[step & 1][1]);
      mma_16816<T>(o[mf][2 * dp + 1], pa[mf][kk], vf[step & 1][2], vf[step & 1][3]);
    }
  }
}

}  // namespace flash
}  // namespace cupy_paged
