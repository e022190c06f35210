// Paged-KV fMHA forward: one thread block per (query tile, query head, sequence) runs CUTLASS's
// fMHA GEMMs and epilogues (the nested types of upstream AttentionKernel) over just the key tiles
// its rows can see, with GQA head mapping, bottom-right causal, sliding window, unmapped-block
// masks and logit softcap; see docs/semantics.md for the contract.
#pragma once
#include "mea/fmha_prelude.cuh"
#include "mea/fmha_paged_epilogue.cuh"
#include "mea/fmha_paged_softmax.cuh"

namespace cupy_paged {
namespace mea {

// The entry point's arguments, in the notation of docs/semantics.md.
template <typename scalar_t>
struct PagedFmhaArgs {
  const scalar_t* q;        // (T, N, H) rows, row stride q_row_stride elements
  int64_t q_row_stride;
  const scalar_t* k;        // (rows, Nkv, H) contiguous: row cu_k[b] + pos is key pos of seq b
  const scalar_t* v;        // (rows, Nkv, H), laid out like k
  scalar_t* out;            // (T, N*H)
  float* out_accum;         // (T, N, H) float32 workspace; only read when kMaxK > kKeysPerBlock
  const int* cu_q;          // (B+1,) query row starts
  const int* cu_k;          // (B+1,) packed key row starts; kv_len_b = cu_k[b+1] - cu_k[b]
  const int* block_table;   // (B, max_blocks); -1 = unmapped
  int max_blocks, block_size, num_heads, kv_num_heads, head_size;
  float scale, softcap;     // softcap <= 0: off
  int window;               // <= 0: off
};

template <typename AK>
struct PagedFmha {
  using scalar_t = typename AK::scalar_t;
  using accum_t = typename AK::accum_t;
  using MM0 = typename AK::MM0;
  using MM1 = typename AK::MM1;
  using Args = PagedFmhaArgs<scalar_t>;
  using Softmax = OnlineSoftmaxTile<AK>;
  using Store = PagedOutputStore<AK>;
  using Output = typename MM1::Mma::FragmentC;

  static constexpr int kQ = AK::kQueriesPerBlock;
  static constexpr int kK = AK::kKeysPerBlock;
  static constexpr int kThreads = AK::kNumThreads;
  static constexpr int kMinBlocksPerSm = AK::kMinBlocksPerSm;
  // kMaxK <= kKeysPerBlock: one pass over V's columns, output accumulated in registers;
  // otherwise each key tile's partial output round-trips through the float32 workspace.
  static constexpr bool kOutputInRF = AK::kKeepOutputInRF;
  static_assert(kOutputInRF == AK::kSingleValueIteration, "the two upstream paths only");
  static_assert(kK <= kThreads, "one thread per key fills the key_ok flags");

  struct SharedStorage {
    typename AK::SharedStorage ak;
    // key_ok[t & 1]: keys of the loop's t-th tile inside the sequence and in a mapped block
    bool key_ok[2][kK];
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));

  // This block's slice of the problem. Pointers are already advanced (64-bit offsets) to
  // the tile's first query row, the sequence's first key row and this head's channels.
  struct Block {
    const scalar_t* q;
    const scalar_t* k;
    const scalar_t* v;
    OutputView<scalar_t> dst;  // this tile's rows of out and of the float32 workspace
    int q_stride, kv_stride;   // row strides in elements
    int rows;          // q_len - first_row: rows from the tile's first to the sequence's end
    int first_row;     // the tile's first query row within the sequence
    int causal_shift;  // kv_len - q_len: query j sees keys up to causal_shift + j
    int key_begin;     // [key_begin, key_end): keys some row of the tile may see
    int key_end;
    const int* table_row;
  };

  __device__ static bool locate(const Args& a, Block& blk) {
    const int b = blockIdx.z, head = blockIdx.y;
    const int first_row = blockIdx.x * kQ;
    const int q_begin = a.cu_q[b];
    const int q_len = a.cu_q[b + 1] - q_begin;
    if (first_row >= q_len) {
      return false;
    }
    const int k_begin = a.cu_k[b];
    const int kv_len = a.cu_k[b + 1] - k_begin;
    const int kv_head = head / (a.num_heads / a.kv_num_heads);  // GQA: G query heads per kv head
    const int64_t q_row = int64_t(q_begin) + first_row;
    blk.q_stride = int(a.q_row_stride);
    blk.kv_stride = a.kv_num_heads * a.head_size;
    const int o_stride = a.num_heads * a.head_size;  // out (T, N*H) and workspace (T, N, H)
    const int64_t kv_offset = int64_t(k_begin) * blk.kv_stride + int64_t(kv_head) * a.head_size;
    const int64_t o_offset = q_row * o_stride + int64_t(head) * a.head_size;
    blk.q = a.q + q_row * a.q_row_stride + int64_t(head) * a.head_size;
    blk.k = a.k + kv_offset;
    blk.v = a.v + kv_offset;
    blk.rows = q_len - first_row;
    blk.dst = {a.out + o_offset, a.out_accum == nullptr ? nullptr : a.out_accum + o_offset,
               o_stride, blk.rows, a.head_size};
    blk.first_row = first_row;
    blk.causal_shift = kv_len - q_len;
    const int last_row = min(q_len, first_row + kQ) - 1;
    blk.key_end = min(kv_len, blk.causal_shift + last_row + 1);
    blk.key_begin = a.window > 0 ? max(0, blk.causal_shift + first_row - a.window + 1) : 0;
    blk.table_row = a.block_table + int64_t(b) * a.max_blocks;
    return true;
  }

  __device__ static void run(const Args& a) {
    Block blk;
    if (!locate(a, blk)) {
      return;  // the whole block agrees: its query tile starts past this sequence's q_len
    }
    extern __shared__ __align__(16) char paged_fmha_smem[];
    SharedStorage& smem = *reinterpret_cast<SharedStorage*>(paged_fmha_smem);
    typename AK::SharedStorage& s = smem.ak;
    const int lane = threadIdx.x;
    const int warp = gemm_kernel_utils::warp_uniform(int(threadIdx.y));
    const int thread = lane + warp * AK::kWarpSize;
    if (blk.key_begin >= blk.key_end) {
      Store::zeros(blk.dst, thread);  // no row of the tile can see any key
      return;
    }

    Softmax::init_rows(s, thread);
    Output out;
    out.clear();
    const ScoreTransform map = ScoreTransform::make(a.scale, a.softcap);
    const int q_rows = min(kQ, blk.rows);
    // The block-table flags of each key tile are looked up one tile ahead (the load's latency
    // hides behind the Q.K^T GEMM), and a CTA-wide AND says whether a tile has an unmapped
    // key at all: most tiles have none and skip the per-key flag test in the softmax. The
    // barrier also publishes init_rows.
    bool all_ok = __syncthreads_and(key_flag(blk, blk.key_begin, smem.key_ok[0], thread, a));
    int parity = 0;
    for (int key0 = blk.key_begin; key0 < blk.key_end; key0 += kK, parity ^= 1) {
      const int n_keys = min(kK, blk.key_end - key0);
      const bool first = key0 == blk.key_begin;
      const bool last = key0 + kK >= blk.key_end;
      // The next tile's flag: loaded now, stored after the GEMM into the other buffer, whose
      // readers (the previous tile's softmax) are behind the previous iteration's barriers.
      const int next_pos = key0 + kK + thread;
      const bool look = !last && thread < kK && next_pos < blk.key_end;
      const int next_block = look ? blk.table_row[next_pos / a.block_size] : 0;

      // scores = Q (q_rows, H) . K^T (H, n_keys)
      typename MM0::IteratorA q_iter(
          typename MM0::IteratorA::Params(typename MM0::MmaCore::LayoutA(blk.q_stride)),
          const_cast<scalar_t*>(blk.q), {q_rows, a.head_size}, thread, {0, 0});
      typename MM0::IteratorB k_iter(
          typename MM0::IteratorB::Params(typename MM0::MmaCore::LayoutB(blk.kv_stride)),
          const_cast<scalar_t*>(blk.k) + int64_t(key0) * blk.kv_stride, {a.head_size, n_keys},
          thread, {0, 0});
      typename MM0::Mma qk(s.mm0, thread, warp, lane);
      typename MM0::Mma::FragmentC scores;
      scores.clear();
      qk((a.head_size + MM0::Mma::Shape::kK - 1) / MM0::Mma::Shape::kK, scores, q_iter, k_iter,
         scores);
      if (thread < kK) smem.key_ok[parity ^ 1][thread] = look && next_block >= 0;
      const bool next_all_ok = __syncthreads_and(!look || next_block >= 0);
      if (AK::kPreloadV) {
        prefetch_v(blk, key0, n_keys, a.head_size, 0, s, thread);  // overlaps the softmax
      } else {
        MM1::Mma::drain_cp_asyncs();
      }

      const typename Softmax::TileCoord tile{warp % MM0::Mma::WarpCount::kM,
                                             warp / MM0::Mma::WarpCount::kM};
      const cutlass::MatrixCoord lane_offset =
          MM0::AccumLambdaIterator::get_lane_offset(lane, warp, tile);
      const TileMask mask{blk.causal_shift + blk.first_row - key0, a.window,
                          all_ok ? nullptr : smem.key_ok[parity]};
      all_ok = next_all_ok;
      const bool masked = !mask.covers_tile(kQ, kK);  // uniform over the block
      if (map.capped) {
        if (masked) {
          Softmax::template logits_and_max<true, true>(scores, lane_offset, map, mask, s, lane);
        } else {
          Softmax::template logits_and_max<true, false>(scores, lane_offset, map, mask, s, lane);
        }
      } else if (masked) {
        Softmax::template logits_and_max<false, true>(scores, lane_offset, map, mask, s, lane);
      } else {
        Softmax::template logits_and_max<false, false>(scores, lane_offset, map, mask, s, lane);
      }
      __syncthreads();
      Softmax::rescale_factors(s, lane, warp);
      __syncthreads();
      if constexpr (kOutputInRF) {
        if (!first) {
          Softmax::template exponentiate<true>(scores, out, lane_offset, tile, s, lane);
        } else {
          Softmax::template exponentiate<false>(scores, out, lane_offset, tile, s, lane);
        }
      } else {
        Softmax::template exponentiate<false>(scores, out, lane_offset, tile, s, lane);
      }
      __syncthreads();
      Softmax::fold_sums(s, lane, warp, last);

      // P to shared memory, where MM1 reads it as its A operand
      const int warp_mn = warp % (MM0::Mma::Base::WarpCount::kM * MM0::Mma::Base::WarpCount::kN);
      MM0::B2bGemm::accumToSmem(s.after_mm0.si, scores, lane,
                                {warp_mn % MM0::Mma::Base::WarpCount::kM,
                                 warp_mn / MM0::Mma::Base::WarpCount::kM});
      __syncthreads();
      multiply_by_v(blk, key0, n_keys, a.head_size, first, last, out, s, thread, warp, lane);
      __syncthreads();  // the next tile overwrites mi/m_prime and the smem unions
    }

    if constexpr (kOutputInRF) {
      MM1::Mma::drain_cp_asyncs();
      Store::template store<true, true>(blk.dst, 0, out, s, thread, warp, lane);
    }
  }

  // Fills flags[thread] for the tile at key0 (thread < kK); returns whether this thread's key
  // is usable or outside the tile (true), for the CTA-wide AND.
  __device__ static bool key_flag(const Block& blk, int key0, bool* flags, int thread,
                                  const Args& a) {
    if (thread >= kK) return true;
    const int pos = key0 + thread;
    const bool inside = pos < blk.key_end;
    const bool ok = inside && blk.table_row[pos / a.block_size] >= 0;
    flags[thread] = ok;
    return ok || !inside;
  }

  // out += P (q_rows, n_keys) . V (n_keys, H), one kKeysPerBlock-wide column block at a time.
  __device__ static void multiply_by_v(const Block& blk, int key0, int n_keys, int head_size,
                                       bool first, bool last, Output& out,
                                       typename AK::SharedStorage& s, int thread, int warp,
                                       int lane) {
    const int col_blocks = kOutputInRF ? 1 : (head_size + MM1::Mma::Shape::kN - 1) /
                                                 MM1::Mma::Shape::kN;
    for (int cb = 0; cb < col_blocks; ++cb) {
      if (!AK::kPreloadV) {
        __syncthreads();  // MM1's operand staging shares memory with the previous epilogue
      }
      typename MM1::Mma::IteratorB v_iter(
          typename MM1::IteratorB::Params{typename MM1::LayoutB(blk.kv_stride)},
          const_cast<scalar_t*>(blk.v) + int64_t(key0) * blk.kv_stride, {n_keys, head_size},
          thread, cutlass::MatrixCoord{0, cb * MM1::Mma::Shape::kN});
      typename MM1::Mma pv(s.after_mm0.si.accum_ref(), s.after_mm0.mm1.operand_B_ref(), thread,
                           warp, lane);
      pv.set_prologue_done(AK::kPreloadV);
      if (!kOutputInRF) {
        out.clear();
      }
      pv((n_keys + MM1::Mma::Shape::kK - 1) / MM1::Mma::Shape::kK, out, v_iter, out);
      __syncthreads();
      if constexpr (!kOutputInRF) {
        // The GEMM's last copies (zero-fill ones past the keys included) must land before the
        // next column block's prologue copies into the same stage: two async copies of one
        // thread to one address may land in either order (compute-sanitizer racecheck flagged
        // the other order, which upstream's loop has, as a potential WAW hazard). The
        // prologue then overlaps this block's epilogue, whose shared memory is its own.
        MM1::Mma::drain_cp_asyncs();
        if (AK::kPreloadV && cb + 1 < col_blocks) {
          prefetch_v(blk, key0, n_keys, head_size, cb + 1, s, thread);
        }
        const int col = cb * MM1::Mma::Shape::kN;
        if (first && last) {
          Store::template store<true, true>(blk.dst, col, out, s, thread, warp, lane);
        } else if (first) {
          Store::template store<true, false>(blk.dst, col, out, s, thread, warp, lane);
        } else if (last) {
          Store::template store<false, true>(blk.dst, col, out, s, thread, warp, lane);
        } else {
          Store::template store<false, false>(blk.dst, col, out, s, thread, warp, lane);
        }
        __syncthreads();
      }
    }
  }

  // Start copying V's column block `cb` of this key tile into MM1's staging buffer.
  __device__ static void prefetch_v(const Block& blk, int key0, int n_keys, int head_size, int cb,
                                    typename AK::SharedStorage& s, int thread) {
    typename MM1::Mma::IteratorB v_iter(
        typename MM1::IteratorB::Params{typename MM1::LayoutB(blk.kv_stride)},
        const_cast<scalar_t*>(blk.v) + int64_t(key0) * blk.kv_stride, {n_keys, head_size},
        thread, cutlass::MatrixCoord{0, cb * MM1::Mma::Shape::kN});
    MM1::Mma::prologue(s.after_mm0.mm1, v_iter, thread, n_keys);
  }
};

}  // namespace mea
}  // namespace cupy_paged
