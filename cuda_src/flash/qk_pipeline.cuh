// S = Q K^T on one key tile: the warp's rows of Q against its slice of the K stage, fp32
// accumulators in the m16n8k16 fragment layout (flash/scores.cuh).
#pragma once
#include "flash/mma.cuh"

namespace cupy_paged {
namespace flash {

// Shared-memory byte addresses of this lane's ldmatrix rows in the warp's Q rows, and in
// stage 0 of its K and V key slice: every fragment address of the pipelines is L::step of one
// of these plus the stage's offset plus a compile-time multiple of 16 rows (padded rows: one
// LDSM [R + imm] each; swizzled rows: an XOR as well).
template <class Tr>
struct FragmentLanes {
  unsigned q, k, v;
  __device__ __forceinline__ FragmentLanes(unsigned q_addr, unsigned k_addr, unsigned v_addr,
                                           int row_warp, int key_off, int lane) {
    using L = typename Tr::Layout;
    q = L::lane_base(q_addr, row_warp * Tr::WARP_ROWS + (lane & 15), lane >> 4);
    k = L::lane_base(k_addr, key_off + (lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1);
    v = L::lane_base(v_addr, key_off + (lane & 15), lane >> 4);
  }
};

// s = Q K^T (fp32), 16 channels at a time; channels >= H are zero, skipped when whole.
// Fragments are loaded one MMA step ahead (two register sets), so an ldmatrix's latency hides
// behind the previous step's MMAs instead of stalling the MMAs that use it. k_stage: the K
// lane address in the stage being computed.
template <class Tr, int MF, int NF>
__device__ __forceinline__ void compute_scores(float (&s)[MF][NF][4], unsigned q_lane,
                                               unsigned k_stage) {
  using T = typename Tr::T;
  using L = typename Tr::Layout;
  constexpr int ROW_BYTES = Tr::ROW_BYTES;
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int nf = 0; nf < NF; ++nf)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mf][nf][e] = 0.0f;
  constexpr int NP = NF / 2, STEPS = Tr::HEAD / 16 * NP;  // step = (kk, np)
  unsigned qa[2][MF][4], kf[2][4];
#pragma unroll
  for (int mf = 0; mf < MF; ++mf) ldmatrix_x4(qa[0][mf], q_lane + mf * 16 * ROW_BYTES);
  ldmatrix_x4(kf[0], k_stage);
#pragma unroll
  for (int step = 0; step < STEPS; ++step) {
    const int kk = step / NP, np = step % NP;
    if (step + 1 < STEPS) {
      const int kk1 = (step + 1) / NP, np1 = (step + 1) % NP;
      if (np1 == 0) {
#pragma unroll
        for (int mf = 0; mf < MF; ++mf)
          ldmatrix_x4(qa[kk1 & 1][mf], L::step(q_lane + mf * 16 * ROW_BYTES, kk1));
      }
      ldmatrix_x4(kf[(step + 1) & 1], L::step(k_stage + np1 * 16 * ROW_BYTES, kk1));
    }
#pragma unroll
    for (int mf = 0; mf < MF; ++mf) {
      mma_16816<T>(s[mf][2 * np], qa[kk & 1][mf], kf[step & 1][0], kf[step & 1][1]);
      mma_16816<T>(s[mf][2 * np + 1], qa[kk & 1][mf], kf[step & 1][2], kf[step & 1][3]);
    }
  }
}

}  // namespace flash
}  // namespace cupy_paged
