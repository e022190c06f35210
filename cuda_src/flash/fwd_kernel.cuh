// The flash forward kernel: one CTA per (query tile of one sequence, kv head, key split). The G
// query heads of a kv head are packed into the tile's rows (row = token * G + g), so K/V tiles
// are read once per kv head and a decode step still fills the MMA's 16 rows. fwd is the
// algorithm; each step lives in its own header.
#pragma once
#include "common/pdl.cuh"
#include "flash/cta_tile.cuh"
#include "flash/key_warps.cuh"
#include "flash/kv_stages.cuh"
#include "flash/online_softmax.cuh"
#include "flash/output.cuh"
#include "flash/params.cuh"
#include "flash/pv_pipeline.cuh"
#include "flash/qk_pipeline.cuh"
#include "flash/scores.cuh"
#include "flash/traits.cuh"

namespace cupy_paged {
namespace flash {

template <class Tr>
__device__ __forceinline__ void fwd(const FwdParams& p) {
  constexpr int MF = Tr::MFRAG, NF = Tr::NFRAG, DF = Tr::DFRAG;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const FwdSmem<Tr> sm(smem_raw);
  const WarpRole<Tr> me;

  // Locate the tile: sequence, rows, this split's key tiles (cta_tile.cuh).
  CtaTile t;
  if (!locate_tile<Tr>(p, me.tid, t)) return;

  // Prologue: the key-row offsets of the first STAGES tiles (block-table reads: before the wait
  // for the prologue kernel), then Q and the first STAGES - 1 K/V tiles, one commit group per
  // tile (Q rides in the first).
  const KvStages<Tr> kv(p, t, sm);
  kv.look_up_first(me.tid);
  __syncthreads();
  pdl::wait();  // q (rotated) and the new keys and values are the prologue kernel's
  pdl::launch_dependents();  // the combine (split-KV) may start; it waits for this kernel
  load_q_tile<Tr>(sm.q_addr, static_cast<const typename Tr::T*>(p.q), t.q_begin, t.row0,
                  t.rows, t.group, t.kvh * t.group, p.num_heads, t.head_size, me.tid);
  unsigned hole_bits = 0;  // bit s: this thread saw an unloadable key in the tile of stage s
  kv.load_first(hole_bits, me.tid);

  const ScoreMasks<Tr> masks(t, me);
  float o[MF][DF][4];
  RowState st[MF][2];
#pragma unroll
  for (int mf = 0; mf < MF; ++mf) {
#pragma unroll
    for (int d = 0; d < DF; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mf][d][e] = 0.0f;
    st[mf][0] = st[mf][1] = RowState::empty();
  }
  const ScoreTransform tr{p.scale_log2, p.cap_in, p.cap_out, p.cap_in > 0.0f};
  const float softmax_scale = tr.capped ? 1.0f : tr.scale_log2;  // softcapped: log2 domain
  const FragmentLanes<Tr> lanes(sm.q_addr, sm.k_addr, sm.v_addr, me.row_warp, me.key_off,
                                me.lane);

  // The key loop: tile kt's K/V are in stage pos.stage, its key offsets in slot pos.slot
  // (kv_stages.cuh).
  auto pos = RingPos<Tr::STAGES>::first();
  for (int kt = t.my_lo; kt < t.my_hi; ++kt) {
    LookAhead<Tr> ahead;
    const bool hole = kv.begin_tile(kt, pos, hole_bits, ahead, me.tid);
    const unsigned k_stage = lanes.k + pos.stage * Tr::KV_BYTES;
    const unsigned v_stage = lanes.v + pos.stage * Tr::KV_BYTES;
    float s[MF][NF][4];
    compute_scores<Tr>(s, lanes.q, k_stage);
    if (tr.capped) softcap_scores(s, tr);
    masks.apply(s, kt * Tr::BN, p.window, hole, kv.offsets(pos.slot));
    online_softmax(s, o, st, softmax_scale);
    accumulate_pv<Tr>(o, s, v_stage);
    kv.end_tile(pos, ahead, me.tid);
    pos.advance();
  }

  // Finalize (key-warp merge), then write the output rows, or this split's partials.

  finalize_rows<Tr>(o, st, sm.k, me.row_warp, me.key_warp, me.lane);
  if (p.num_splits == 1)
    write_output<Tr>(p, t, me, sm.q, o, st);
  else
    write_partials<Tr>(p, t, me, o, st);
}

}  // namespace flash
}  // namespace cupy_paged
