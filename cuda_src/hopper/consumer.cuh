// A consumer warpgroup of the sm90a flash kernel: 64 query rows against every K/V tile the
// producer publishes. Tile j: S_j = Q K_j^T (wgmma, both operands in shared memory) is issued
// together with O += P_{j-1} V_{j-1} (P from registers, V in shared memory), and the softmax of
// S_j (the shared flash steps on the accumulators: softcap, causal / window / unloadable-key
// masks, online softmax; a consumer warp is an sm80 warp of one 16-row fragment) runs while
// the tensor cores still multiply P_{j-1} V_{j-1}; only the output rescale waits for them.
// Each K and V stage is handed back as soon as it is read. Then the output rows.
#pragma once
#include "common/dtypes.cuh"
#include "common/score_transform.cuh"
#include "flash/cta_tile.cuh"
#include "flash/online_softmax.cuh"
#include "flash/output.cuh"
#include "flash/scores.cuh"
#include "hopper/smem.cuh"
#include "hopper/swizzle_tile.cuh"
#include "hopper/sync.cuh"
#include "hopper/wgmma.cuh"

namespace cupy_paged {
namespace hopper {

// A consumer thread's place: its warp (0 .. 7 over both groups) owns tile rows 16 warp ..
// 16 warp + 15; the interface of flash::WarpRole that the shared steps read.
struct ConsumerRole {
  int tid, lane, row_warp, group;
  static constexpr int key_warp = 0, key_off = 0;
  __device__ __forceinline__ explicit ConsumerRole(int consumer_tid)
      : tid(consumer_tid), lane(consumer_tid & 31), row_warp(consumer_tid >> 5),
        group(consumer_tid >> 7) {}
  __device__ __forceinline__ int row(int, int h) const {
    return row_warp * 16 + (lane >> 2) + 8 * h;
  }
};

// Issues S = Q K^T of one key tile (HEAD / 16 MMAs of 16 channels, the first overwriting s)
// as one group.
template <class Tr>
__device__ __forceinline__ void issue_scores(float (&s)[Tr::NFRAG][4], unsigned q_rows,
                                             unsigned k_tile) {
#pragma unroll
  for (int k = 0; k < Tr::HEAD / 16; ++k)
    wgmma::Mma<typename Tr::T, Tr::BN>::ss(
        s, wgmma::k_major(q_rows + SwizzledTile<Tr::BM>::k_step(0, k)),
        wgmma::k_major(k_tile + SwizzledTile<Tr::BN>::k_step(0, k)), k > 0);
  wgmma::commit();
}

// Issues O += P V of one key tile as one group: pa, the probabilities rounded to T, are the A
// registers, V's 16-key steps the B operands.
template <class Tr>
__device__ __forceinline__ void issue_values(float (&o)[Tr::DFRAG][4],
                                             const unsigned (&pa)[Tr::BN / 16][4],
                                             unsigned v_tile) {
#pragma unroll
  for (int kk = 0; kk < Tr::BN / 16; ++kk)
    wgmma::Mma<typename Tr::T, Tr::HEAD>::rs(
        o, pa[kk], wgmma::mn_major(v_tile + kk * 16 * 128, SwizzledTile<Tr::BN>::PANEL_BYTES),
        1);
  wgmma::commit();
}

// The probabilities as A registers: the accumulator layout of S is the A layout of 16 keys.
template <class Tr>
__device__ __forceinline__ void pack_probabilities(unsigned (&pa)[Tr::BN / 16][4],
                                                   const float (&s)[Tr::NFRAG][4]) {
  using T = typename Tr::T;
#pragma unroll
  for (int kk = 0; kk < Tr::BN / 16; ++kk) {
    pa[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
    pa[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
    pa[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    pa[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

// A ring position: stage and the parity of its current use.
template <int STAGES>
struct RingSlot {
  int stage = 0;
  unsigned parity = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == STAGES) {
      stage = 0;
      parity ^= 1u;
    }
  }
};

// The consumer groups' turns at the tensor cores (Traits90::PINGPONG): group g waits on named
// barrier 4 + g until the other group has issued, issues, then lets the other go. Both groups
// run the same tiles, so the turns pair up: group 1 opens with one arrival on group 0's
// barrier and group 0 closes with one wait on it (hopper/consumer.cuh's consume).
struct Turns {
  int mine, other;
  __device__ __forceinline__ explicit Turns(int group) : mine(4 + group), other(5 - group) {}
  __device__ __forceinline__ void wait() const { named_sync(mine, 256); }
  __device__ __forceinline__ void pass() const {
    asm volatile("bar.arrive %0, 256;\n" :: "r"(other) : "memory");
  }
};

// The group's output rows: o / (l + sink term), rounded to T, staged in the group's own rows
// of the unit's Q tile `staged` (swizzled: conflict-free 4-byte stores), then written as
// 16-byte chunks.
template <class Tr>
__device__ __forceinline__ void write_rows(const flash::FwdParams& p, const flash::CtaTile& t,
                                           const ConsumerRole& me,
                                           const float (&o)[Tr::DFRAG][4],
                                           const softmax::RowState (&st)[2],
                                           unsigned char* staged) {
  using T = typename Tr::T;
  using Q = SwizzledTile<Tr::BM>;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = me.row(0, h);
    const float inv = st[h].inv_sum(flash::row_sink<Tr>(p, t, r));
#pragma unroll
    for (int d = 0; d < Tr::DFRAG; ++d)
      *reinterpret_cast<unsigned*>(staged + Q::chunk(r, d) + (me.lane & 3) * 4) =
          pack2<T>(o[d][2 * h] * inv, o[d][2 * h + 1] * inv);
  }
  named_sync(2 + me.group, 128);
  constexpr int PER_PASS = 128 / Tr::CHUNKS;
  const int gtid = me.tid & 127, c = gtid % Tr::CHUNKS, r0 = gtid / Tr::CHUNKS;
  if (r0 >= PER_PASS || c * 8 >= t.head_size) return;
  T* out = static_cast<T*>(p.out);
  const int G = t.group, H = t.head_size;
  for (int rl = r0; rl < Tr::GROUP_ROWS; rl += PER_PASS) {
    const int r = me.group * Tr::GROUP_ROWS + rl, row = t.row0 + r;
    if (row >= t.rows) break;
    const int j = row / G;
    *reinterpret_cast<uint4*>(
        out + ((t.q_begin + j) * static_cast<long long>(p.num_heads) + t.kvh * G + row - j * G) *
                  H + c * 8) = *reinterpret_cast<const uint4*>(staged + Q::chunk(r, c));
  }
}

// A consumer warpgroup. Its state across work units: the positions in the K and V rings and
// how many Q tiles it has used.
template <class Tr>
struct Consumer {
  const Smem90<Tr> sm;
  const ConsumerRole me;
  RingSlot<Tr::STAGES> k_ring, v_ring;  // v_ring trails k_ring by one tile within a unit
  int q_uses = 0;  // Q tiles used: this unit's is q_uses % Q_BUFS

  __device__ __forceinline__ Consumer(const flash::FwdParams&, const Smem90<Tr>& sm_,
                                      int consumer_tid)
      : sm(sm_), me(consumer_tid) {}

  // One work unit; its Q tile (holding the staged output) is handed back after the output.
  __device__ __forceinline__ void run(const flash::FwdParams& p, const flash::CtaTile& t) {
    const int buf = q_uses % Tr::Q_BUFS;
    compute(p, t, buf, static_cast<unsigned>(q_uses / Tr::Q_BUFS) & 1u);
    release(sm.q_empty(buf), me.lane);
    ++q_uses;
  }

  // A persistent CTA: the units the producer's thread 0 publishes (hopper/producer.cuh's
  // run_all), until it says none is left.
  __device__ __forceinline__ void run_all(const flash::FwdParams& p) {
    for (int n = 0;; ++n) {
      const int slot = n & 1;
      mbar_wait(sm.unit_full(slot), (n >> 1) & 1);
      const UnitSlot* u = sm.unit(slot);
      const int state = u->state;
      const flash::CtaTile t = u->t;
      release(sm.unit_empty(slot), me.lane);
      if (state < 0) return;
      if (state > 0) run(p, t);
    }
  }

  __device__ __forceinline__ void compute(const flash::FwdParams& p, const flash::CtaTile& t,
                                          int buf, unsigned q_parity);
};

template <class Tr>
__device__ __forceinline__ void Consumer<Tr>::compute(const flash::FwdParams& p,
                                                      const flash::CtaTile& t, int buf,
                                                      unsigned q_parity) {
  constexpr int NF = Tr::NFRAG, DF = Tr::DFRAG;
  const flash::ScoreMasks<Tr> masks(t, me);
  float o[1][DF][4];
  float s[1][NF][4];
  softmax::RowState st[1][2];
#pragma unroll
  for (int d = 0; d < DF; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[0][d][e] = 0.0f;
  st[0][0] = st[0][1] = softmax::RowState::empty();
  const ScoreTransform tr{p.scale_log2, p.cap_in, p.cap_out, p.cap_in > 0.0f};
  const float softmax_scale = tr.capped ? 1.0f : tr.scale_log2;
  const unsigned q_rows = sm.q_addr(buf) + me.group * Tr::GROUP_ROWS * 128;

  mbar_wait(sm.q_full(buf), q_parity);
  if (t.my_hi <= t.my_lo) {  // no key tile: the rows see no key (o = 0)
    write_rows<Tr>(p, t, me, o[0], st[0], sm.q_tile(buf));
    return;
  }
  unsigned pa[Tr::BN / 16][4];  // P of the previous tile
  float corr[1][2];
  bool moved;
  // The scores of tile kt (landed in s) -> probabilities; its K stage is handed back.
  auto softmax_step = [&](int kt) {
    wgmma::fence_operands(s[0]);
    if (tr.capped) flash::softcap_scores(s, tr);
    masks.apply(s, kt * Tr::BN, p.window, sm.holes()[k_ring.stage] != 0,
                sm.key_rows(k_ring.stage));
    // K and its key rows are read: every thread arrives for its own reads of the rows (a
    // warp's one arrival after __syncwarp is what compute-sanitizer's racecheck reported)
    mbar_arrive(sm.k_empty(k_ring.stage));
    k_ring.advance();
    moved = false;
    flash::softmax_tile(s, st, softmax_scale, corr, moved);
  };
  // Tile lo: S alone.
  mbar_wait(sm.k_full(k_ring.stage), k_ring.parity);
  proxy_fence();  // the landed copies, before the tensor cores read them
  wgmma::fence();
  issue_scores<Tr>(s[0], q_rows, sm.k_addr(k_ring.stage));
  wgmma::wait<0>();
  softmax_step(t.my_lo);
  pack_probabilities<Tr>(pa, s[0]);
  // Tiles lo + 1 ..: S_j with P_{j-1} V_{j-1}; the softmax of S_j while the latter runs.
  const Turns turns(me.group);
  const bool turns_on = Tr::PINGPONG && t.my_hi - t.my_lo > 1;
  if (turns_on && me.group == 1) turns.pass();
  for (int kt = t.my_lo + 1; kt < t.my_hi; ++kt) {
    mbar_wait(sm.k_full(k_ring.stage), k_ring.parity);
    mbar_wait(sm.v_full(v_ring.stage), v_ring.parity);
    proxy_fence();
    if (Tr::PINGPONG) turns.wait();
    wgmma::fence();
    issue_scores<Tr>(s[0], q_rows, sm.k_addr(k_ring.stage));
    issue_values<Tr>(o[0], pa, sm.v_addr(v_ring.stage));
    if (Tr::PINGPONG) turns.pass();
    wgmma::wait<1>();  // S_j has landed; P_{j-1} V_{j-1} may still run
    softmax_step(kt);
    wgmma::wait<0>();
    wgmma::fence_operands(o[0]);
    release(sm.v_empty(v_ring.stage), me.lane);
    v_ring.advance();
    flash::rescale_output(o, corr, moved);
    pack_probabilities<Tr>(pa, s[0]);
  }
  if (turns_on && me.group == 0) turns.wait();  // group 1's last pass
  // The last tile's P V.
  mbar_wait(sm.v_full(v_ring.stage), v_ring.parity);
  proxy_fence();
  wgmma::fence();
  issue_values<Tr>(o[0], pa, sm.v_addr(v_ring.stage));
  wgmma::wait<0>();
  wgmma::fence_operands(o[0]);
  release(sm.v_empty(v_ring.stage), me.lane);  // the next unit's tiles reuse the rings
  v_ring.advance();
  flash::reduce_row_sums(st);
  write_rows<Tr>(p, t, me, o[0], st[0], sm.q_tile(buf));
}

}  // namespace hopper
}  // namespace cupy_paged
