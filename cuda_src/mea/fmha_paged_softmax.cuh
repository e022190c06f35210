// One key tile of the paged fMHA's online softmax: turn raw q.k dot products into masked log2
// logits (common/score_transform.cuh, common/visibility.cuh, unmapped-block masks), then fold
// them into the running (max, sum) rows kept in shared memory with common/softmax_state.cuh's
// rules, so that a row which saw no key stays at sum 0.
#pragma once
#include "common/score_transform.cuh"
#include "common/softmax_state.cuh"
#include "common/visibility.cuh"
#include "mea/fmha_prelude.cuh"

namespace cupy_paged {
namespace mea {

using softmax::neg_inf;

// Max of a float in shared memory, by integer atomics. Non-negative floats order like signed
// ints; negative ones order like unsigned ints in reverse. Branching on the sign bit (not on
// value >= 0) sends -0.0 down the unsigned path, where it correctly beats -inf.
__device__ __forceinline__ void atomic_max_float(float* addr, float value) {
  if (__float_as_int(value) >= 0) {
    atomicMax(reinterpret_cast<int*>(addr), __float_as_int(value));
  } else {
    atomicMin(reinterpret_cast<unsigned int*>(addr), __float_as_uint(value));
  }
}

// Where the visible keys of a score tile lie, in the tile's own column numbers: row m (of the
// query tile) has the position of column m + last_shift (common/visibility.cuh's rule), and
// sees only columns whose key_ok flag is set (key inside the sequence and its block mapped).
struct TileMask {
  int last_shift;       // kv_len - q_len + query_start - key_tile_start
  int window;           // W > 0: sliding window of W keys; <= 0: none
  const bool* key_ok;   // (kKeysPerBlock,) in shared memory; null: every key of the tile is usable

  // Whether every column of a (rows x cols) tile is visible to every row: no unmapped key, and
  // the columns fully visible from the rows' positions. Then the tile needs no per-element mask
  // (most key tiles of a long prefill).
  __device__ __forceinline__ bool covers_tile(int rows, int cols) const {
    return key_ok == nullptr && !partly_hidden(0, cols - 1, last_shift, rows - 1 + last_shift,
                                               window);
  }
};

// AK: the upstream AttentionKernel whose MM0/MM1 GEMMs we run; we use its accumulator
// layout (AccumLambdaIterator) and its ScalingCoefs rows (mi, m_prime, s_prime, out_rescale,
// addition_storage) but not its iterative_softmax, which yields NaN for fully masked rows.
//   mi[r]         running max of row r's logits so far (-inf: nothing seen yet)
//   m_prime[r]    the same, as of the previous tile
//   s_prime[r]    running sum of exp2(logit - mi[r])
//   out_rescale[r] factor the previous output accumulators must be multiplied by
template <typename AK>
struct OnlineSoftmaxTile {
  using accum_t = typename AK::accum_t;
  using Iter = typename AK::MM0::AccumLambdaIterator;
  using Scores = typename AK::MM0::Mma::FragmentC;
  using Output = typename AK::MM1::Mma::FragmentC;
  using TileCoord = typename AK::MM0::Mma::Operator::IteratorC::TensorCoord;
  using Rows = cutlass::Array<accum_t, AK::kQueriesPerBlock>;

  static constexpr int kRows = AK::kQueriesPerBlock;
  static constexpr int kWarpsN = AK::MM0::MmaCore::WarpCount::kN;
  static constexpr int kRowsPerWarp = kRows / AK::kNumWarpsPerBlock;
  static_assert(kRows % AK::kNumWarpsPerBlock == 0, "each warp owns whole rows of the tile");
  static_assert(kRows <= AK::kNumThreads, "one thread per row initialises the row state");

  static_assert(sizeof(accum_t) == 4, "float accumulators: common/softmax_state.cuh's math");

  // Before the first tile: nothing seen, nothing to rescale.
  __device__ static void init_rows(typename AK::SharedStorage& s, int thread) {
    if (thread < kRows) {
      s.mi[thread] = neg_inf();
      s.m_prime[thread] = neg_inf();
      s.s_prime[thread] = accum_t(0);
      s.out_rescale[thread] = accum_t(1);
    }
  }

  // scores (raw q.k) -> masked log2 logits in place; row maxima merged into s.mi.
  // kMasked = false: the caller knows every (row, column) of the tile is visible
  // (TileMask::covers_tile), and the per-element mask tests are left out.
  template <bool kCapped, bool kMasked>
  __device__ __forceinline__ static void logits_and_max(
      Scores& scores, cutlass::MatrixCoord lane_offset, ScoreTransform map, TileMask mask,
      typename AK::SharedStorage& s, int lane) {
    VisibleColumns cols(0, 0, 0);
    accum_t row_max = neg_inf();
    Iter::iterateRows(
        lane_offset,
        [&](int m) {
          cols = VisibleColumns(m + mask.last_shift, 0, mask.window);
          row_max = neg_inf();
        },
        [&](int m, int n, int idx) {
          accum_t x = neg_inf();
          if (!kMasked || (cols.contains(n) && (mask.key_ok == nullptr || mask.key_ok[n]))) {
            x = kCapped ? map.softcapped(scores[idx]) : map.plain(scores[idx]);
          }
          scores[idx] = x;
          row_max = cutlass::fast_max(row_max, x);
        },
        [&](int m) {
          if (Iter::reduceSameRow(lane, row_max, [](accum_t a, accum_t b) {
                return cutlass::fast_max(a, b);
              })) {
            atomic_max_float(&s.mi[m], row_max);
          }
        });
  }

  // After logits_and_max and a __syncthreads: one thread per row computes how much the old
  // sum and output shrink now that the max grew. The max is exact (shared-memory atomics),
  // not lazy: every growth rescales.
  __device__ __forceinline__ static void rescale_factors(typename AK::SharedStorage& s, int lane,
                                                         int warp) {
    if (lane < kRowsPerWarp) {
      int r = warp * kRowsPerWarp + lane;
      accum_t old_max = s.m_prime[r], new_max = s.mi[r];
      accum_t factor = old_max < new_max ? softmax::rescale_factor(old_max, new_max) : accum_t(1);
      s.out_rescale[r] = factor;
      s.s_prime[r] *= factor;
    }
  }

  // After rescale_factors and a __syncthreads: logits -> unnormalised probabilities, partial
  // row sums to addition_storage; the register-resident output (if any) is rescaled. The
  // output fragment is walked with MM0's iterator: with one value iteration MM1's tile is
  // (kQueriesPerBlock, kKeysPerBlock) too, so both fragments share the accumulator layout.
  template <bool kRescaleOutput>
  __device__ __forceinline__ static void exponentiate(
      Scores& scores, Output& out, cutlass::MatrixCoord lane_offset, TileCoord tile,
      typename AK::SharedStorage& s, int lane) {
    if (kRescaleOutput) {
      accum_t factor = 1;
      Iter::iterateRows(
          lane_offset, [&](int m) { factor = s.out_rescale[m]; },
          [&](int m, int n, int idx) { out[idx] *= factor; }, [&](int m) {});
    }
    accum_t ref = 0, sum = 0;
    Iter::iterateRows(
        lane_offset,
        [&](int m) {
          ref = softmax::exponent_offset(s.mi[m]);
          sum = 0;
        },
        [&](int m, int n, int idx) {
          scores[idx] = fast_exp2(scores[idx] - ref);
          sum += scores[idx];
        },
        [&](int m) {
          if (Iter::reduceSameRow(lane, sum, [](accum_t a, accum_t b) { return a + b; })) {
            s.addition_storage[m + kRows * tile.column()] = sum;
          }
        });
  }

  // After exponentiate and a __syncthreads: one thread per row adds the tile's sum. On the
  // last tile the sum becomes the epilogue's divisor (1 for a row that saw no key: its output
  // is 0).
  __device__ __forceinline__ static void fold_sums(typename AK::SharedStorage& s, int lane,
                                                   int warp, bool last_tile) {
    if (lane < kRowsPerWarp) {
      int r = warp * kRowsPerWarp + lane;
      accum_t total = s.s_prime[r];
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kWarpsN; ++i) {
        total += s.addition_storage[r + kRows * i];
      }
      s.s_prime[r] = last_tile ? softmax::divisor(total) : total;
      s.m_prime[r] = s.mi[r];
    }
  }
};

}  // namespace mea
}  // namespace cupy_paged
