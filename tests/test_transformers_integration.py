"""cupy_paged.integrations.transformers: the mapping from transformers' continuous-batching
metadata to paged_attention's arguments (NumPy only: runs without torch or transformers), the
adapter end to end on the CPU against transformers' own paged sdpa path (skips without
torch + transformers), and the example on a GPU (``gpu`` marker)."""
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from cupy_paged.integrations import transformers as hf

REPO = Path(__file__).resolve().parents[1]
PAGE = 4
LAYERS = 3
STRIDE = 2 * PAGE * LAYERS          # transformers' block_physical_stride


def _layout(num_blocks=64):
    return hf.CacheLayout(num_layers=LAYERS, num_blocks=num_blocks, page_size=PAGE,
                          kv_heads=2, head_dim=8, block_stride=STRIDE)


def _transformers_indices(blocks, past, q_len):
    """read_index / write_index rows as transformers builds them for one sequence."""
    def row(position):
        return blocks[position // PAGE] * STRIDE + position % PAGE
    read = [row(p) for p in range(past + q_len)]
    write = [row(p) for p in range(past, past + q_len)]
    return read, write


def _batch(sequences, padding_rows=0):
    """transformers-style metadata for [(blocks, past, q_len)], plus padding query rows."""
    cu_q, cu_k, read, write = [0], [0], [], []
    for blocks, past, q_len in sequences:
        r, w = _transformers_indices(blocks, past, q_len)
        read += r
        write += w
        cu_q.append(cu_q[-1] + q_len)
        cu_k.append(cu_k[-1] + past + q_len)
    write += [7 * STRIDE] * padding_rows          # padding tokens go to the write trash
    as32 = lambda x: numpy.array(x, numpy.int32)  # noqa: E731
    return (as32(cu_q), as32(cu_k), numpy.array(read, numpy.int64),
            numpy.array(write, numpy.int64), cu_q[-1] + padding_rows)


def test_ragged_batch_with_prefill_and_decode_rows_maps_exactly():
    sequences = [([5, 9, 2], 9, 1),          # decode, third page
                 ([11, 3], 0, 6),            # prefill from 0 across a page boundary
                 ([4, 8, 13, 6], 5, 7),      # chunked prefill continuing mid-page
                 ([20], 3, 1)]               # decode finishing a page
    cu_q, cu_k, read, write, rows = _batch(sequences, padding_rows=3)
    max_k = max(p + q for _, p, q in sequences)
    args = hf.batch_arguments(_layout(), rows, cu_q, cu_k, read_index=read, write_index=write,
                              max_length_k=max_k)
    cum, past, table = args.cumulative_sequence_length, args.past_seqlens, args.block_table
    assert cum.dtype == past.dtype == table.dtype == numpy.int32
    # one extra sequence owns the 3 padding rows, with no block mapped
    assert cum.tolist() == [0, 1, 7, 14, 15, 18]
    assert past.tolist() == [9, 0, 5, 3, 0]
    assert table.shape == (5, max(-(-max_k // PAGE), -(-rows // PAGE)))
    for b, (blocks, past_b, q_len) in enumerate(sequences):
        used = -(-(past_b + q_len) // PAGE)
        assert table[b, :used].tolist() == blocks[:used]
        assert (table[b, used:] == -1).all()
    assert (table[-1] == -1).all()
    # every new token lands where transformers would have written it
    hf.check_write_index(cum[:-1], past[:-1], table[:-1], write, PAGE, STRIDE)
    assert args.max_seqlen_q >= 7 and args.max_seqlen_k >= max_k
    assert args.total_kv_tokens >= int(cu_k[-1]) + 3


def test_batch_without_cache_reads_maps_from_write_index():
    sequences = [([1, 2], 0, 5), ([3], 0, 2)]
    cu_q, cu_k, _, write, rows = _batch(sequences)
    args = hf.batch_arguments(_layout(), rows, cu_q, cu_k, read_index=numpy.zeros(0, numpy.int64),
                              write_index=write, max_length_k=5)
    assert args.past_seqlens.tolist() == [0, 0, 0]
    assert args.block_table[0, :2].tolist() == [1, 2] and args.block_table[1, 0] == 3
    assert args.block_table[1, 1:].tolist() == [-1] * (args.block_table.shape[1] - 1)


def test_the_mapping_computes_what_transformers_would():
    """Feed the mapped arguments to the NumPy reference; compare with dense causal attention
    over the tokens transformers would gather."""
    import cupy_paged
    rng = numpy.random.default_rng(0)
    sequences = [([5, 9, 2], 9, 1), ([11, 3], 0, 6), ([4, 8, 13, 6], 5, 7)]
    cu_q, cu_k, read, write, rows = _batch(sequences, padding_rows=2)
    layout = _layout(num_blocks=24)
    heads, kv_heads, dim = 4, 2, 8
    args = hf.batch_arguments(layout, rows, cu_q, cu_k, read_index=read, write_index=write,
                              max_length_k=16)
    key_cache = rng.standard_normal((24, PAGE, kv_heads, dim))
    value_cache = rng.standard_normal((24, PAGE, kv_heads, dim))
    history_k = key_cache.copy()
    history_v = value_cache.copy()
    q = rng.standard_normal((rows, heads * dim))
    k = rng.standard_normal((rows, kv_heads * dim))
    v = rng.standard_normal((rows, kv_heads * dim))
    out = cupy_paged.paged_attention(q, k, v, key_cache, value_cache,
                                     args.cumulative_sequence_length, args.past_seqlens,
                                     args.block_table, num_heads=heads, kv_num_heads=kv_heads)
    for b, (blocks, past, q_len) in enumerate(sequences):
        start = int(cu_q[b])
        # the keys transformers would gather: the past from the cache, then the new rows
        positions = numpy.arange(past + q_len)
        page, offset = numpy.array(blocks)[positions // PAGE], positions % PAGE
        keys = history_k[page, offset].copy()
        values = history_v[page, offset].copy()
        keys[past:] = k[start:start + q_len].reshape(q_len, kv_heads, dim)
        values[past:] = v[start:start + q_len].reshape(q_len, kv_heads, dim)
        for j in range(q_len):
            for n in range(heads):
                g = n // (heads // kv_heads)
                s = keys[:past + j + 1, g] @ q[start + j, n * dim:(n + 1) * dim] / numpy.sqrt(dim)
                w = numpy.exp(s - s.max())
                expected = (w / w.sum()) @ values[:past + j + 1, g]
                numpy.testing.assert_allclose(out[start + j, n * dim:(n + 1) * dim], expected,
                                              rtol=1e-10, atol=1e-12)
        # and the new keys were written where the block table says
        numpy.testing.assert_array_equal(key_cache[page[past:], offset[past:]],
                                         keys[past:])
    assert (out[int(cu_q[-1]):] == 0).all()     # padding rows see nothing


def test_empty_batch():
    cu = numpy.zeros(1, numpy.int32)
    empty = numpy.zeros(0, numpy.int64)
    args = hf.batch_arguments(_layout(), 0, cu, cu, read_index=empty, write_index=empty)
    assert args.cumulative_sequence_length.tolist() == [0, 0]
    assert args.past_seqlens.tolist() == [0]
    assert args.block_table.shape == (1, 1) and args.block_table[0, 0] == -1
    hf.check_write_index(args.cumulative_sequence_length[:-1], args.past_seqlens[:-1],
                         args.block_table[:-1], empty, PAGE, STRIDE)


def test_fast_path_block_table_maps_page_ids_to_blocks():
    per_block = 2 * LAYERS
    kernel = numpy.array([[5 * per_block, 9 * per_block, -1], [3 * per_block, -1, -1]],
                         numpy.int32)
    cu_q = numpy.array([0, 1, 2], numpy.int32)
    cu_k = numpy.array([0, 6, 8], numpy.int32)
    args = hf.batch_arguments(_layout(), 2, cu_q, cu_k, kernel_table=kernel)
    assert args.block_table[:2].tolist() == [[5, 9, -1], [3, -1, -1]]
    assert args.past_seqlens.tolist() == [5, 1, 0]


@pytest.mark.parametrize("layer_types, rows, stride, what", [
    (["sliding_attention"], 2, STRIDE, "one full-attention group"),
    (["full_attention", "sliding_attention"], 2, STRIDE, "hybrid"),
    (["full_attention"], 1, STRIDE, "rows per token"),
    (["full_attention"], 2, STRIDE + PAGE, "block_physical_stride"),
])
def test_unmappable_layouts_raise_naming_what_differs(layer_types, rows, stride, what):
    layout = hf.CacheLayout(num_layers=LAYERS, num_blocks=8, page_size=PAGE, kv_heads=2,
                            head_dim=8, block_stride=stride)
    with pytest.raises(hf.TransformersLayoutError, match=what):
        hf.check_layout(layer_types, rows, layout)
    hf.check_layout(["full_attention"], 2, _layout())       # the one we map


def test_rows_that_are_not_sequence_contiguous_are_refused():
    sequences = [([5, 9, 2], 9, 1), ([11, 3], 0, 6)]
    cu_q, cu_k, read, write, rows = _batch(sequences)
    args = hf.batch_arguments(_layout(), rows, cu_q, cu_k, read_index=read, write_index=write,
                              max_length_k=10)
    shuffled = write.copy()
    shuffled[[0, 3]] = shuffled[[3, 0]]                    # rows of two sequences interleaved
    with pytest.raises(hf.TransformersLayoutError, match="write_index"):
        hf.check_write_index(args.cumulative_sequence_length[:-1], args.past_seqlens[:-1],
                             args.block_table[:-1], shuffled, PAGE, STRIDE)


def test_the_mapping_module_imports_neither_torch_nor_transformers():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "import cupy_paged.integrations.transformers as m; import numpy; "
            "cu = numpy.array([0, 1], numpy.int32); "
            "a = m.batch_arguments(m.CacheLayout(1, 4, 2, 1, 8, 4), 1, cu, "
            "numpy.array([0, 3], numpy.int32), read_index=numpy.array([4, 5, 8], numpy.int64), "
            "max_length_k=3); print(a.block_table.tolist(), a.past_seqlens.tolist())")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[[1, 2], [-1, -1]] [2, 0]"


def _tiny_llama():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"needs transformers >= 5, found {transformers.__version__}")
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def _generate(model, prompts):
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    generation = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=-1,
                                  pad_token_id=0)
    batching = ContinuousBatchingConfig(page_size=16, num_blocks=64, max_batch_tokens=48,
                                        return_logprobs=True, auto_switch_to_flash=False)
    outputs = model.generate_batch(prompts, generation_config=generation,
                                   continuous_batching_config=batching)
    for out in outputs.values():
        assert out.error is None, out.error
    return {key: (out.generated_tokens, out.logprobs) for key, out in outputs.items()}


def test_registered_function_matches_transformers_paged_sdpa_on_cpu():
    model = _tiny_llama()
    from transformers import AttentionInterface
    name = hf.register()
    assert name in AttentionInterface._global_mapping
    rng = numpy.random.default_rng(1)
    # prompts longer than max_batch_tokens: chunked prefill, mixed prefill + decode batches
    prompts = [rng.integers(3, 250, size=int(n)).tolist() for n in rng.integers(3, 70, 10)]
    model.set_attn_implementation("sdpa")
    reference = _generate(model, prompts)
    assert hf.prepare(model) == name
    ours = _generate(model, prompts)
    assert model.config._attn_implementation == name
    for key, (tokens, logprobs) in reference.items():
        assert ours[key][0] == tokens, key
        numpy.testing.assert_allclose(ours[key][1], logprobs, atol=1e-4)
    model.set_attn_implementation("sdpa")                  # hooks stand aside under sdpa
    again = _generate(model, prompts)
    assert {key: tokens for key, (tokens, _) in again.items()} == \
        {key: tokens for key, (tokens, _) in reference.items()}


def test_register_refuses_a_name_continuous_batching_would_refuse():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="flash"):
        hf.register("cupy_paged")


@pytest.mark.gpu
def test_example_short_run_matches_transformers_on_gpu():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, str(REPO / "examples" / "hf_continuous_batching.py"),
                           "--requests", "8", "--new-tokens", "8", "--layers", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tokens/s" in done.stdout and ": ok" in done.stdout, done.stdout[-2000:]
