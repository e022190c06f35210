"""PagedKVCache: allocator bookkeeping, step metadata, gather and fork.

The op is simulated by ``_write_step``: position p of a sequence goes to block
block_table[b][p // bs], offset p % bs (spec/semantics.md, step 3), so gather and fork are
checked against what the op would write, without needing the op.
"""

import numpy
import pytest

from cupy_paged.cache import CacheFullError, PagedKVCache, StepMetadata

BLOCK_SIZES = [1, 3, 16]
DTYPES = [numpy.float16, numpy.float32]
NKV, H = 2, 8


def _host(array):
    return array.get() if hasattr(array, "get") else numpy.asarray(array)


def _write_step(cache, step, rng):
    """Write random K/V for the step's new tokens through its block table, as the op does.

    Returns {sid: (K_new, V_new)} as host arrays (q_len, Nkv, H). Asserts that no write lands
    in a block another sequence holds (copy-on-write must make that impossible).
    """
    cum, past, table = (_host(a) for a in (step.cumulative_sequence_length,
                                           step.past_seqlens, step.block_table))
    bs, xp = cache.block_size, cache.xp
    written = {}
    for b, sid in enumerate(step.seq_ids):
        q_len = int(cum[b + 1] - cum[b])
        k_new = rng.standard_normal((q_len, NKV, H)).astype(cache.dtype)
        v_new = rng.standard_normal((q_len, NKV, H)).astype(cache.dtype)
        for j in range(q_len):
            p = int(past[b]) + j
            block = int(table[b, p // bs])
            assert block >= 0, f"position {p} of sequence {sid} has no block"
            assert cache.refcount(block) == 1, f"write into shared block {block}"
            cache.key_cache[block, p % bs] = xp.asarray(k_new[j])
            cache.value_cache[block, p % bs] = xp.asarray(v_new[j])
        written[sid] = (k_new, v_new)
    return written


def _check_invariants(cache):
    """Refcounts equal the number of holders; free + held blocks partition all blocks."""
    holders = numpy.zeros(cache.num_blocks, dtype=numpy.int64)
    for sid in cache.sequences:
        blocks = cache.blocks_of(sid)
        assert len(blocks) == -(-cache.length(sid) // cache.block_size)
        assert len(set(blocks)) == len(blocks)
        holders[blocks] += 1
    assert [cache.refcount(i) for i in range(cache.num_blocks)] == holders.tolist()
    assert cache.num_free_blocks == int((holders == 0).sum())


# --- allocation ------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_allocate_free_reuse_round_trip(block_size):
    cache = PagedKVCache(8, block_size, NKV, H)
    a, b = cache.add_sequence(), cache.add_sequence()
    assert (a, b) == (0, 1) and cache.sequences == (0, 1)
    cache.begin_step({a: 2 * block_size, b: block_size + 1})
    assert cache.blocks_of(a) == [0, 1] and cache.blocks_of(b) == [2, 3]
    assert cache.num_free_blocks == 4
    cache.free(a)
    assert cache.sequences == (b,) and cache.num_free_blocks == 6
    c = cache.add_sequence()
    assert c == 2, "sequence ids are never reused"
    cache.begin_step([(c, 3 * block_size)])
    assert cache.blocks_of(c) == [0, 1, 4], "freed blocks are reused, lowest id first"
    cache.free(b)
    cache.free(c)
    assert cache.num_free_blocks == 8 and cache.sequences == ()
    _check_invariants(cache)


def test_begin_step_metadata_hand_checked():
    # block_size 3; comments give each sequence's blocks after the step.
    cache = PagedKVCache(10, 3, NKV, H)
    a, b, c = (cache.add_sequence() for _ in range(3))

    step = cache.begin_step({a: 5, b: 0, c: 3})        # a: [0, 1]  b: []  c: [2]
    assert isinstance(step, StepMetadata)
    assert step.seq_ids == (a, b, c) and step.num_tokens == 8
    assert step.cumulative_sequence_length.tolist() == [0, 5, 5, 8]
    assert step.past_seqlens.tolist() == [0, 0, 0]
    assert step.block_table.tolist() == [[0, 1], [-1, -1], [2, -1]]

    step = cache.begin_step({c: 2, a: 4, b: 1})        # c: [2, 3]  a: [0, 1, 4]  b: [5]
    assert step.seq_ids == (c, a, b) and step.num_tokens == 7
    assert step.cumulative_sequence_length.tolist() == [0, 2, 6, 7]
    assert step.past_seqlens.tolist() == [3, 5, 0]
    assert step.block_table.tolist() == [[2, 3, -1], [0, 1, 4], [5, -1, -1]]
    assert [cache.length(s) for s in (a, b, c)] == [9, 1, 5]

    step = cache.begin_step({a: 1})                    # a was exactly full: a new block
    assert step.past_seqlens.tolist() == [9]
    assert step.block_table.tolist() == [[0, 1, 4, 6]]

    d = cache.add_sequence()
    step = cache.begin_step({d: 0})                    # empty and stays empty
    assert step.num_tokens == 0
    assert step.cumulative_sequence_length.tolist() == [0, 0]
    assert step.past_seqlens.tolist() == [0]
    assert step.block_table.tolist() == [[-1]], "max_blocks is at least 1"


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_step_metadata_dtypes_and_padding(block_size):
    cache = PagedKVCache(64, block_size, NKV, H, allocation="random", seed=1)
    sids = [cache.add_sequence() for _ in range(4)]
    lengths = [0, 1, block_size, 3 * block_size + 1]
    step = cache.begin_step(list(zip(sids, lengths)))
    for array in (step.cumulative_sequence_length, step.past_seqlens, step.block_table):
        assert isinstance(array, numpy.ndarray) and array.dtype == numpy.int32
        assert array.flags.c_contiguous
    table = step.block_table
    assert table.shape == (4, 4)
    for row, length in enumerate(lengths):
        n = -(-length // block_size)
        assert table[row, :n].tolist() == cache.blocks_of(sids[row])
        assert (table[row, n:] == -1).all()
    assert numpy.cumsum([0] + lengths).tolist() == step.cumulative_sequence_length.tolist()


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_cache_full_leaves_state_unchanged(block_size):
    cache = PagedKVCache(5, block_size, NKV, H, allocation="random", seed=3)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.begin_step({a: 2 * block_size, b: 1})
    before = (repr(cache), cache.blocks_of(a), cache.blocks_of(b), cache.num_free_blocks)
    # a needs 2 more blocks, b needs 1 more: 3 > 2 free.
    with pytest.raises(CacheFullError, match=r"needs 3 new blocks.*only 2 of 5 are free"):
        cache.begin_step({a: 2 * block_size, b: block_size})
    assert (repr(cache), cache.blocks_of(a), cache.blocks_of(b),
            cache.num_free_blocks) == before
    assert issubclass(CacheFullError, ValueError)
    # The same random stream continues: a step that fits still works afterwards.
    cache.begin_step({a: 2 * block_size})
    assert cache.num_free_blocks == 0
    _check_invariants(cache)


def test_random_allocation_is_a_seeded_permutation():
    def all_blocks(seed):
        cache = PagedKVCache(32, 1, NKV, H, allocation="random", seed=seed)
        sid = cache.add_sequence()
        cache.begin_step({sid: 32})
        return cache.blocks_of(sid)

    blocks = all_blocks(7)
    assert sorted(blocks) == list(range(32))
    assert blocks != list(range(32)), "random allocation handed out blocks in order"
    assert all_blocks(7) == blocks, "same seed, same order"
    assert all_blocks(8) != blocks


# --- gather and fork -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_gather_round_trip(block_size, dtype):
    rng = numpy.random.default_rng(block_size)
    cache = PagedKVCache(40, block_size, NKV, H, dtype=dtype, allocation="random", seed=0)
    sids = [cache.add_sequence() for _ in range(3)]
    expected = {s: ([], []) for s in sids}
    for counts in ([5, 0, 1], [0, 2 * block_size + 1, 1], [1, 1, 1], [block_size, 0, 7]):
        step = cache.begin_step(dict(zip(sids, counts)))
        for sid, (k, v) in _write_step(cache, step, rng).items():
            expected[sid][0].append(k)
            expected[sid][1].append(v)
        for sid in sids:
            keys, values = cache.gather(sid)
            assert keys.shape == (cache.length(sid), NKV, H) and keys.dtype == dtype
            numpy.testing.assert_array_equal(keys, numpy.concatenate(expected[sid][0]))
            numpy.testing.assert_array_equal(values, numpy.concatenate(expected[sid][1]))
    _check_invariants(cache)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_fork_shares_full_blocks_and_copies_partial(block_size, dtype):
    rng = numpy.random.default_rng(0)
    cache = PagedKVCache(32, block_size, NKV, H, dtype=dtype)
    parent = cache.add_sequence()
    length = 2 * block_size + 1 if block_size > 1 else 5
    parent_kv = _write_step(cache, cache.begin_step({parent: length}), rng)[parent]
    full = length // block_size
    free_before = cache.num_free_blocks

    child = cache.fork(parent)
    assert cache.length(child) == length
    p_blocks, c_blocks = cache.blocks_of(parent), cache.blocks_of(child)
    assert c_blocks[:full] == p_blocks[:full]
    assert all(cache.refcount(blk) == 2 for blk in p_blocks[:full])
    partial = length % block_size != 0
    if partial:
        assert c_blocks[full] != p_blocks[full]
        assert cache.refcount(p_blocks[full]) == cache.refcount(c_blocks[full]) == 1
    assert cache.num_free_blocks == free_before - partial
    for got, want in zip(cache.gather(child), parent_kv):
        numpy.testing.assert_array_equal(got, want)

    # Both continue; _write_step asserts no write reaches a shared block.
    step = cache.begin_step({parent: block_size + 2, child: 1})
    written = _write_step(cache, step, rng)
    for sid, prefix in ((parent, parent_kv), (child, parent_kv)):
        keys, values = cache.gather(sid)
        numpy.testing.assert_array_equal(keys, numpy.concatenate([prefix[0], written[sid][0]]))
        numpy.testing.assert_array_equal(values, numpy.concatenate([prefix[1], written[sid][1]]))
    _check_invariants(cache)

    # A shared block is freed only when its last holder goes.
    cache.free(parent)
    assert all(cache.refcount(blk) == 1 for blk in p_blocks[:full])
    _check_invariants(cache)
    cache.free(child)
    assert cache.num_free_blocks == cache.num_blocks
    assert all(cache.refcount(blk) == 0 for blk in range(cache.num_blocks))


def test_fork_of_exactly_full_sequence_needs_no_free_block():
    cache = PagedKVCache(2, 4, NKV, H)
    a = cache.add_sequence()
    cache.begin_step({a: 8})
    b = cache.fork(a)                       # nothing partial: all blocks shared
    assert cache.blocks_of(b) == [0, 1] and cache.num_free_blocks == 0
    c = cache.fork(cache.add_sequence())    # empty sequences fork to empty ones
    assert cache.length(c) == 0 and cache.blocks_of(c) == []


def test_fork_without_room_for_the_partial_copy():
    cache = PagedKVCache(1, 4, NKV, H)
    a = cache.add_sequence()
    cache.begin_step({a: 3})
    with pytest.raises(CacheFullError, match="fork"):
        cache.fork(a)
    assert cache.sequences == (a,) and cache.refcount(0) == 1


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_random_workload_keeps_invariants(block_size, seed):
    """Steps, forks and frees in random order; gather always returns what was written."""
    rng = numpy.random.default_rng(seed)
    cache = PagedKVCache(24, block_size, NKV, H, dtype=numpy.float32,
                         allocation="random", seed=seed)
    expected = {}
    for _ in range(40):
        action = rng.integers(4)
        if action == 0 or not cache.sequences:
            expected[cache.add_sequence()] = (numpy.zeros((0, NKV, H), "f4"),) * 2
        elif action == 1:
            sid = int(rng.choice(cache.sequences))
            try:
                expected[cache.fork(sid)] = expected[sid]
            except CacheFullError:
                pass
        elif action == 2 and len(cache.sequences) > 1:
            sid = int(rng.choice(cache.sequences))
            cache.free(sid)
            del expected[sid]
        else:
            chosen = rng.permutation(cache.sequences)[: rng.integers(1, 4)]
            counts = {int(s): int(rng.integers(0, 2 * block_size + 2)) for s in chosen}
            try:
                step = cache.begin_step(counts)
            except CacheFullError:
                continue
            for sid, (k, v) in _write_step(cache, step, rng).items():
                expected[sid] = (numpy.concatenate([expected[sid][0], k]),
                                 numpy.concatenate([expected[sid][1], v]))
        _check_invariants(cache)
        for sid in cache.sequences:
            keys, values = cache.gather(sid)
            numpy.testing.assert_array_equal(keys, expected[sid][0])
            numpy.testing.assert_array_equal(values, expected[sid][1])


# --- construction, errors, repr --------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_caches_are_zeroed_with_the_documented_shape(dtype):
    cache = PagedKVCache(3, 5, 2, 8, dtype=dtype, xp="numpy")
    for array in (cache.key_cache, cache.value_cache):
        assert isinstance(array, numpy.ndarray)
        assert array.shape == (3, 5, 2, 8) and array.dtype == dtype
        assert not array.any()
    assert cache.xp is numpy and cache.dtype == dtype


def test_repr_shows_usage_and_lengths():
    cache = PagedKVCache(4, 2, NKV, H)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.begin_step({a: 3, b: 1})
    text = repr(cache)
    assert "blocks used=3" in text and "free=1" in text
    assert "sequence lengths={0: 3, 1: 1}" in text


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(num_blocks=0), ValueError, r"num_blocks must be >= 1 \(got 0\)"),
    (dict(block_size=2.0), TypeError, "block_size must be an integer"),
    (dict(kv_num_heads=True), TypeError, "kv_num_heads must be an integer"),
    (dict(head_size=-8), ValueError, "head_size must be >= 1"),
    (dict(dtype=numpy.int32), TypeError, "dtype must be a floating dtype"),
    (dict(xp="torch"), TypeError, "xp must be"),
    (dict(allocation="lifo"), ValueError, "allocation must be"),
])
def test_constructor_errors(kwargs, error, pattern):
    args = dict(num_blocks=4, block_size=2, kv_num_heads=NKV, head_size=H)
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        PagedKVCache(**args)


def test_argument_errors_name_the_argument():
    cache = PagedKVCache(4, 2, NKV, H)
    a = cache.add_sequence()
    with pytest.raises(ValueError, match="sid 7 is not a live sequence"):
        cache.begin_step({7: 1})
    with pytest.raises(TypeError, match="sid must be an int"):
        cache.length("0")
    with pytest.raises(ValueError, match=r"new_tokens\[0\] must be >= 0 \(got -1\)"):
        cache.begin_step({a: -1})
    with pytest.raises(ValueError, match="names sequence 0 twice"):
        cache.begin_step([(a, 1), (a, 2)])
    with pytest.raises(ValueError, match="at least one sequence"):
        cache.begin_step({})
    with pytest.raises(TypeError, match=r"\(sid, n\) pairs"):
        cache.begin_step([a])
    with pytest.raises(TypeError, match="new_tokens must be a mapping"):
        cache.begin_step(3)
    assert cache.length(a) == 0 and cache.num_free_blocks == 4
    cache.free(a)
    with pytest.raises(ValueError, match="not a live sequence"):
        cache.free(a)


@pytest.mark.parametrize("dtype, scale", [(numpy.float32, None), ("int8", (0.02, 0.05))])
def test_attention_kwargs_is_the_direct_call(dtype, scale):
    """cpg.paged_attention(**cache.attention_kwargs(step, q, k, v), ...) is the call with every
    argument spelled out (standard layout: both caches, both scales, v_head_size None)."""
    import cupy_paged as cpg
    rng = numpy.random.default_rng(4)
    cache = PagedKVCache(8, 4, NKV, H, dtype=dtype, scale=scale)
    a, b = cache.add_sequence(), cache.add_sequence()
    step = cache.begin_step({a: 5, b: 2})
    q, k, v = (0.5 * rng.standard_normal((7, n * H), dtype=numpy.float32)
               for n in (4, NKV, NKV))
    kw = cache.attention_kwargs(step, q, k, v)
    assert kw["kv_cache_layout"] == "standard" and kw["v_head_size"] is None
    assert kw["key_cache"] is cache.key_cache and kw["value_cache"] is cache.value_cache
    assert kw["k_scale"] is cache.k_scale and kw["v_scale"] is cache.v_scale
    kc, vc = cache.key_cache.copy(), cache.value_cache.copy()
    expected = cpg.paged_attention(q, k, v, kc, vc, step.cumulative_sequence_length,
                                   step.past_seqlens, step.block_table, num_heads=4,
                                   kv_num_heads=NKV, k_scale=cache.k_scale,
                                   v_scale=cache.v_scale)
    numpy.testing.assert_array_equal(cpg.paged_attention(**kw, num_heads=4), expected)
    numpy.testing.assert_array_equal(cache.key_cache, kc)
    numpy.testing.assert_array_equal(cache.value_cache, vc)


# --- GPU -------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_cupy_metadata_and_gather(block_size):
    cupy = pytest.importorskip("cupy")
    rng = numpy.random.default_rng(0)
    cache = PagedKVCache(32, block_size, NKV, H, xp=cupy, allocation="random", seed=2)
    assert isinstance(cache.key_cache, cupy.ndarray)
    a, b = cache.add_sequence(), cache.add_sequence()
    step = cache.begin_step({a: 2 * block_size + 1, b: 0})
    for array in (step.cumulative_sequence_length, step.past_seqlens, step.block_table):
        assert isinstance(array, cupy.ndarray) and array.dtype == numpy.int32
        assert array.flags.c_contiguous and array.data.ptr % 16 == 0
    n = 2 * block_size + 1
    assert step.cumulative_sequence_length.get().tolist() == [0, n, n]
    assert step.past_seqlens.get().tolist() == [0, 0]
    assert step.block_table.get()[0].tolist() == cache.blocks_of(a)
    written = _write_step(cache, step, rng)
    child = cache.fork(a)
    for sid in (a, child):
        keys, values = cache.gather(sid)
        assert isinstance(keys, cupy.ndarray)
        numpy.testing.assert_array_equal(keys.get(), written[a][0])
        numpy.testing.assert_array_equal(values.get(), written[a][1])
