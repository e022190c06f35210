// Scores on MMA fragments, in the order the contract fixes: s = scale * q.k, softcap
// c * tanh(s / c) (common/score_transform.cuh), then the masks of common/visibility.cuh
// (causal, window) and the keys that cannot be loaded (unmapped blocks, past the sequence).
//
// Fragment layout (m16n8k16 accumulators): s[mf][nf][e] is row 16 mf + lane / 4 + 8 (e / 2),
// key 8 nf + 2 (lane % 4) + (e % 2) of the warp's rows and the tile's keys.
#pragma once
#include "common/score_transform.cuh"
#include "common/softmax_state.cuh"
#include "common/visibility.cuh"
#include "flash/cta_tile.cuh"

namespace cupy_paged {
namespace flash {

using softmax::neg_inf;

// With softcap on, replaces the raw q.k by c tanh(scale q.k / c) log2(e) (log2 domain; the
// softmax then runs with scale 1). Softcap off: the scores stay raw and the softmax folds
// scale * log2(e) into its exponent (one FFMA per score instead of an FMUL and an FADD).
template <int MF, int NF>
__device__ __forceinline__ void softcap_scores(float (&s)[MF][NF][4], const ScoreTransform& tr) {
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int nf = 0; nf < NF; ++nf)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mf][nf][e] = tr.softcapped(s[mf][nf][e]);
}

// Sets to -inf every score whose key k = k0 + column is not visible from its row's position
// (pos[mf][h]: the absolute positions of this thread's rows).
template <int MF, int NF>
__device__ __forceinline__ void mask_causal_window(float (&s)[MF][NF][4],
                                                   const int (&pos)[MF][2], int k0, int window,
                                                   int lane) {
  const int key0 = k0 + (lane & 3) * 2;  // key of this thread's first column
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const VisibleColumns cols(pos[mf][h], key0, window);  // column j = 8 nf + e1
#pragma unroll
      for (int nf = 0; nf < NF; ++nf)
#pragma unroll
        for (int e1 = 0; e1 < 2; ++e1)
          if (!cols.contains(nf * 8 + e1)) s[mf][nf][2 * h + e1] = neg_inf();
    }
}

// Sets to -inf every score whose key is not loadable: offsets[key_off + k] is key k's cache
// offset in this warp's slice (KeyRowOffsets::store: negative for unmapped blocks and
// positions outside [0, kv_len); any column of signed integers, e.g. smem_layout.cuh's
// SideColumn<long long>). Only tiles with such a key.
template <int MF, int NF, class Offsets>
__device__ __forceinline__ void mask_unloadable(float (&s)[MF][NF][4], const Offsets& offsets,
                                                int key_off, int lane) {
#pragma unroll
  for (int nf = 0; nf < NF; ++nf)
#pragma unroll
    for (int e1 = 0; e1 < 2; ++e1) {
      const int kr = nf * 8 + (lane & 3) * 2 + e1;
      if (offsets[key_off + kr] < 0) {
#pragma unroll
        for (int mf = 0; mf < MF; ++mf)
#pragma unroll
          for (int h = 0; h < 2; ++h) s[mf][nf][2 * h + e1] = neg_inf();
      }
    }
}

// The masks of one thread's scores: its rows' absolute positions (pos[mf][h]) and those of the
// CTA tile's first and last row. apply masks a tile of keys [k0, k0 + BN) for window W (<= 0:
// none): causal / window only
// when some key of the tile is hidden from some row, unloadable keys only when the tile has one.
template <class Tr>
struct ScoreMasks {
  static constexpr int MF = Tr::MFRAG;
  int pos[MF][2];
  int p_first, p_last, key_off, lane;

  // me: the thread's warp (WarpRole<Tr>, or a role with the same row / key_off / lane)
  template <class Role>
  __device__ __forceinline__ ScoreMasks(const CtaTile& t, const Role& me)
      : p_first(t.p_first), p_last(t.p_last), key_off(me.key_off), lane(me.lane) {
#pragma unroll
    for (int mf = 0; mf < MF; ++mf)
#pragma unroll
      for (int h = 0; h < 2; ++h) pos[mf][h] = t.past + (t.row0 + me.row(mf, h)) / t.group;
  }
  template <int NF, class Offsets>
  __device__ __forceinline__ void apply(float (&s)[MF][NF][4], int k0, int window, bool hole,
                                        const Offsets& offsets) const {
    if (partly_hidden(k0, k0 + Tr::BN - 1, p_first, p_last, window))
      mask_causal_window(s, pos, k0 + key_off, window, lane);
    if (hole) mask_unloadable(s, offsets, key_off, lane);
  }
};

}  // namespace flash
}  // namespace cupy_paged
