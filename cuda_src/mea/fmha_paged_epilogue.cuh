// Output stores of the paged fMHA: a key tile's P.V accumulators go through upstream's
// pipelined epilogue, merged with the earlier tiles' float32 partial (workspace) and, on the
// last tile, divided by the softmax row sum and written in the input dtype.
#pragma once
#include "mea/fmha_prelude.cuh"

namespace cupy_paged {
namespace mea {

// One query tile's destination rows, pointers advanced to the tile's first row and its head.
template <typename scalar_t>
struct OutputView {
  scalar_t* out;       // (T, N*H) output
  float* partial;      // (T, N, H) float32 workspace, or nullptr when the output stays in RF
  int row_stride;      // N*H for both
  int rows;            // rows that exist from the tile's first (may exceed the tile)
  int head_size;
};

template <typename AK>
struct PagedOutputStore {
  using scalar_t = typename AK::scalar_t;
  using accum_t = typename AK::accum_t;
  using MM1 = typename AK::MM1;
  using Output = typename MM1::Mma::FragmentC;
  using SharedStorage = typename AK::SharedStorage;
  using PartialIter = typename MM1::OutputTileIteratorAccum;

  // Write the column block starting at `col` (rows s_prime / out_rescale of shared storage):
  //   kFirst: nothing earlier to merge; else add out_rescale * the workspace's partial;
  //   kLast: divide by the row sum and store scalar_t to out; else store float32 to the
  //   workspace. With the output kept in registers this runs once, as <true, true>.
  template <bool kFirst, bool kLast>
  __device__ static void store(const OutputView<scalar_t>& view, int col, Output& acc,
                               SharedStorage& s, int thread, int warp, int lane) {
    using DefaultEpilogue = typename MM1::DefaultEpilogue;
    using DefaultOp = typename MM1::DefaultConfig::EpilogueOutputOp;
    using Compute = typename DefaultOp::ElementCompute;
    using DestIter = typename cutlass::platform::conditional<
        kLast, typename MM1::OutputTileIterator, PartialIter>::type;
    using Normalize = cutlass::epilogue::thread::MemoryEfficientAttentionNormalize<
        typename cutlass::platform::conditional<kLast, scalar_t, accum_t>::type, accum_t,
        DefaultOp::kCount, typename DefaultOp::ElementAccumulator, Compute, kFirst, kLast,
        cutlass::Array<Compute, AK::kQueriesPerBlock>>;
    using Epilogue = cutlass::epilogue::threadblock::EpiloguePipelined<
        typename DefaultEpilogue::Shape, typename MM1::Mma::Operator,
        DefaultEpilogue::kPartitionsK, DestIter,
        typename DefaultEpilogue::AccumulatorFragmentIterator,
        typename DefaultEpilogue::WarpTileIterator, typename DefaultEpilogue::SharedLoadIterator,
        Normalize, typename DefaultEpilogue::Padding, DefaultEpilogue::kFragmentsPerIteration,
        true, PartialIter>;

    const typename DestIter::TensorCoord extent{view.rows, view.head_size};
    DestIter dest = destination<kLast, DestIter>(view, extent, thread, col);
    Normalize normalize(s.s_prime, s.out_rescale);
    Epilogue epilogue(s.epilogue_shared_storage(), thread, warp, lane);
    if constexpr (kFirst) {
      epilogue(normalize, dest, acc);
    } else {
      PartialIter partial(typename PartialIter::Params{view.row_stride}, view.partial, extent,
                          thread, {0, col});
      epilogue(normalize, dest, acc, partial);
    }
  }

  // Rows of a tile that can see no key at all: the spec's output is exactly 0.
  __device__ static void zeros(const OutputView<scalar_t>& view, int thread) {
    const int rows = min(AK::kQueriesPerBlock, view.rows);
    for (int i = thread; i < rows * view.head_size; i += AK::kNumThreads) {
      view.out[int64_t(i / view.head_size) * view.row_stride + i % view.head_size] = scalar_t(0);
    }
  }

 private:
  template <bool kFinal, typename Iter>
  __device__ static Iter destination(const OutputView<scalar_t>& view,
                                     typename Iter::TensorCoord extent, int thread, int col) {
    if constexpr (kFinal) {
      return Iter(typename Iter::Params{view.row_stride}, view.out, extent, thread, {0, col});
    } else {
      return Iter(typename Iter::Params{view.row_stride}, view.partial, extent, thread, {0, col});
    }
  }
};

}  // namespace mea
}  // namespace cupy_paged
