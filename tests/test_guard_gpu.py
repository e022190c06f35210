"""The metadata guard on the GPU: whatever cumulative_sequence_length, past_seqlens,
block_table and the host bounds say, no kernel leaves its arrays; stopped sequences' rows are
NaN and they write nothing; valid sequences of the same batch still match the reference; the
error word names the first fault; the host checks (validate=True) and the guard agree.

Every adversarial case mixes faulted and valid sequences in one batch and runs on each GPU
backend. The guard's verdict is also compared, bit for bit, with a NumPy mirror of its rules.
"""
import dataclasses
import re
import time

import numpy as np
import pytest

import cupy_paged
from cupy_paged import _validate
from cupy_paged.backends import _guard
from cupy_paged.errors import MetadataError
from cupy_paged.reference import paged_attention_reference

try:
    from .gpu_parity import K_RTOL, OUT_TOL, host_dtype
    from .paged_cases import Case, bits, make_inputs, rel_err
except ImportError:
    from gpu_parity import K_RTOL, OUT_TOL, host_dtype
    from paged_cases import Case, bits, make_inputs, rel_err

pytestmark = pytest.mark.gpu

BACKENDS = ["mea", "flash"]
# q_len, past per sequence: T = 10, ends (8, 21, 4, 11, 7); block size 4 -> 6 + 3 extra columns
BASE = Case("guard", lens=((3, 5), (1, 20), (4, 0), (2, 9), (0, 7)), N=4, Nkv=2, H=64, bs=4,
            rotary="neox", extra_cols=3, spare=4)
HINTS = ("max_seqlen_q", "max_seqlen_k", "total_kv_tokens")


@pytest.fixture(autouse=True)
def drained():
    """Every test starts and ends with a clean error word."""
    for _ in range(2):
        try:
            cupy_paged.check_errors()
        except MetadataError:
            pass
    yield
    try:
        cupy_paged.check_errors()
    except MetadataError:
        pass


@dataclasses.dataclass(frozen=True)
class Info:
    """Facts of an input the mutations refer to."""

    T: int
    B: int
    num_blocks: int
    capacity: int
    cos_rows: int
    total: int


@dataclasses.dataclass(frozen=True)
class Adversarial:
    name: str
    edits: tuple          # (array name, index, value or f(info, meta)) applied in order
    faulted: tuple        # stopped sequences; None: the whole batch
    first: tuple          # (fault name, sequence) check_errors reports
    hints: tuple = ()     # (hint name, value or f(info))


def _v(x, info, meta):
    return x(info, meta) if callable(x) else x


ADVERSARIAL = [
    Adversarial("past_negative", (("past", 1, -3),), (1,), ("past", 1)),
    Adversarial("past_negative_qlen0", (("past", 4, -1),), (4,), ("past", 4)),
    Adversarial("past_int32_max", (("past", 0, 2**31 - 1),), (0,), ("capacity", 0)),
    Adversarial("block_id_num_blocks", (("table", (2, 0), lambda i, m: i.num_blocks),), (2,),
                ("block_id", 2)),
    Adversarial("block_id_below_minus_one", (("table", (1, 5), -7),), (1,), ("block_id", 1)),
    Adversarial("block_id_int32_min", (("table", (3, 2), -2**31),), (3,), ("block_id", 3)),
    Adversarial("capacity", (("past", 3, lambda i, m: i.capacity - 1),), (3,), ("capacity", 3)),
    Adversarial("rotary_past_cos_rows", (("past", 3, lambda i, m: i.cos_rows - 1),), (3,),
                ("rotary", 3)),
    Adversarial("max_seqlen_q", (), (2,), ("max_seqlen_q", 2), (("max_seqlen_q", 3),)),
    Adversarial("max_seqlen_k", (), (1,), ("max_seqlen_k", 1), (("max_seqlen_k", 20),)),
    Adversarial("total_kv_tokens", (), None, ("total_kv_tokens", 5),
                (("total_kv_tokens", lambda i: i.total - 1),)),
    Adversarial("cum_start", (("cum", 0, 1),), None, ("cum_start", 0)),
    Adversarial("cum_end", (("cum", 5, lambda i, m: i.T - 1),), None, ("cum_end", 5)),
    Adversarial("cum_decreasing", (("cum", 2, lambda i, m: int(m["cum"][3]) + 1),), None,
                ("cum_order", 2)),
    Adversarial("cum_garbage", (("cum", 1, 2**31 - 1), ("cum", 3, -5)), None, ("cum_order", 1)),
    Adversarial("two_sequences", (("past", 3, -1), ("table", (1, 0), 99999)), (1, 3),
                ("past", 3)),
]


# ---------------------------------------------------------------- inputs and mirrors


def base_inputs(dtype, seed=11):
    inp = make_inputs(dataclasses.replace(BASE, dtype="float32"), np.random.default_rng(seed))
    low = [None if x is None or x.dtype.kind != "f" else x.astype(host_dtype(dtype))
           for x in inp.args]
    args = [x if low[i] is None else low[i] for i, x in enumerate(inp.args)]
    return args, inp.kwargs


def info_of(args):
    cum, past, table, cos = args[5], args[6], args[7], args[8]
    ends = past.astype(np.int64) + np.diff(cum.astype(np.int64))
    return Info(T=int(cum[-1]), B=len(past), num_blocks=args[3].shape[0],
                capacity=table.shape[1] * args[3].shape[1], cos_rows=cos.shape[0],
                total=int(ends.sum()))


def mutate(adv, args):
    """(args with the metadata edited, call hints) of an adversarial case."""
    info = info_of(args)
    meta = {"cum": args[5].copy(), "past": args[6].copy(), "table": args[7].copy()}
    for name, index, value in adv.edits:
        meta[name][index] = _v(value, info, meta)
    hints = {k: (v(info) if callable(v) else v) for k, v in adv.hints}
    return list(args[:5]) + [meta["cum"], meta["past"], meta["table"]] + list(args[8:]), hints


def mirror(problem, cum, past, table):
    """The guard's fault array by its rules, in NumPy (int64 throughout)."""
    cum, past, table = (np.asarray(x, dtype=np.int64) for x in (cum, past, table))
    B, bs = problem.batch, problem.block_size
    q = np.diff(cum)
    end = past + q
    out = np.zeros(B + 1, dtype=np.int64)
    out[:B] |= np.where(past < 0, _guard.FAULT_PAST, 0)
    out[:B] |= np.where((q > 0) & (end > problem.max_blocks * bs), _guard.FAULT_CAPACITY, 0)
    if problem.max_seqlen_q is not None:
        out[:B] |= np.where(q > problem.max_seqlen_q, _guard.FAULT_MAX_SEQLEN_Q, 0)
    if problem.max_seqlen_k is not None:
        out[:B] |= np.where(end > problem.max_seqlen_k, _guard.FAULT_MAX_SEQLEN_K, 0)
    if problem.do_rotary:
        out[:B] |= np.where((q > 0) & (end > problem.cos_rows), _guard.FAULT_ROTARY, 0)
    for b in range(B):
        cols = min(-(-max(int(end[b]), 0) // bs), problem.max_blocks)
        ids = table[b, :cols]
        if ((ids < -1) | (ids >= problem.num_blocks)).any():
            out[b] |= _guard.FAULT_BLOCK_ID
    if cum[0] != 0:
        out[B] |= _guard.FAULT_CUM_START
    if cum[B] != problem.num_tokens:
        out[B] |= _guard.FAULT_CUM_END
    if (cum[:-1] > cum[1:]).any():
        out[B] |= _guard.FAULT_CUM_ORDER
    if problem.total_kv_tokens is not None and end.sum() > problem.total_kv_tokens:
        out[B] |= _guard.FAULT_TOTAL_KV
    return out


# host message -> (fault name, sequence group or None)
HOST_KINDS = [
    (r"^cumulative_sequence_length\[0\]: must be 0", "cum_start", None),
    (r"^cumulative_sequence_length\[\d+\]: must equal", "cum_end", None),
    (r"non-decreasing, got cumulative_sequence_length\[(\d+)\]", "cum_order", 1),
    (r"^past_seqlens\[(\d+)\] = -?\d+: must be >= 0", "past", 1),
    (r"^block_table\[(\d+), \d+\] = ", "block_id", 1),
    (r"^block_table: sequence (\d+) needs", "capacity", 1),
    (r"^max_seqlen_q: ", "max_seqlen_q", None),
    (r"^max_seqlen_k: ", "max_seqlen_k", None),
    (r"^total_kv_tokens: ", "total_kv_tokens", None),
    (r"^cos_cache: sequence (\d+) reaches", "rotary", 1),
]


def host_verdict(problem, cum, past, table):
    """(fault name, sequence or None) of the host's check_metadata, or None when it passes."""
    try:
        _validate.check_metadata(problem, cum, past, table)
    except ValueError as e:
        for pattern, name, group in HOST_KINDS:
            m = re.search(pattern, str(e))
            if m:
                return name, (int(m.group(group)) if group else None)
        raise AssertionError(f"unmapped host message: {e}") from None
    return None


def to_device(args):
    import cupy

    return [None if x is None else cupy.asarray(x) for x in args]


ATTRIBUTES = {"scale": 0.0, "softcap": 0.0, "local_window_size": -1, "do_rotary": False,
              "rotary_interleaved": False}
NAMES = ("query", "key", "value", "key_cache", "value_cache", "cumulative_sequence_length",
         "past_seqlens", "block_table", "cos_cache", "sin_cache")


def problem_of(dev, kwargs, hints):
    """(arrays by name, Problem) of device arguments, as paged_attention builds them."""
    a = {**dict(zip(NAMES, dev)), "out": None}
    attributes = {**ATTRIBUTES, **kwargs, **{k: hints.get(k) for k in HINTS}}
    return a, _validate.check_arguments(a, **attributes)


def run_guard(dev, kwargs, hints):
    """The guard alone: (fault array, out, error word), on host."""
    import cupy

    a, problem = problem_of(dev, kwargs, hints)
    out = cupy.zeros((problem.num_tokens, problem.num_heads * problem.head_size), dev[0].dtype)
    fault = _guard.run_guard(problem, a, out).get()
    return problem, fault, cupy.asnumpy(out), _guard.error_word(cupy.cuda.Device().id)


# ---------------------------------------------------------------- the backends


def reference_valid(args, kwargs, valid):
    """(query rows, reference out rows, caches) of the valid sequences run alone."""
    f32 = [None if x is None or x.dtype.kind != "f" else x.astype(np.float32) for x in args]
    host = [f32[i] if f32[i] is not None else x for i, x in enumerate(args)]
    cum, past, table = args[5].astype(np.int64), args[6], args[7]
    rows = np.concatenate([np.arange(cum[b], cum[b + 1]) for b in valid] + [np.arange(0)])
    q_lens = np.array([cum[b + 1] - cum[b] for b in valid], dtype=np.int64)
    sub_cum = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    kc, vc = host[3].copy(), host[4].copy()
    out = paged_attention_reference(
        host[0][rows], host[1][rows], host[2][rows], kc, vc, sub_cum,
        past[list(valid)], table[list(valid)], host[8], host[9], **kwargs)
    written = np.zeros(kc.shape[:2], dtype=bool)
    bs = kc.shape[1]
    for b in valid:
        for p in range(int(past[b]), int(past[b] + cum[b + 1] - cum[b])):
            blk = table[b, p // bs]
            if blk >= 0:
                written[blk, p % bs] = True
    return rows, out, kc, vc, written


@pytest.mark.parametrize("adv", ADVERSARIAL, ids=lambda a: a.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_guard_stops_faulted_sequences_only(backend, adv):
    import cupy

    dtype = "float16"
    clean, kwargs = base_inputs(dtype)
    args, hints = mutate(adv, clean)
    dev = to_device(args)
    T, NH = args[0].shape[0], kwargs["num_heads"] * args[3].shape[3]
    out = cupy.full((T, NH), 7.0, dtype=host_dtype(dtype))   # not NaN: the guard must write it
    got = cupy_paged.paged_attention(*dev, **kwargs, **hints, backend=backend, out=out)
    assert got is out
    got = cupy.asnumpy(out).astype(np.float32)
    kc, vc = cupy.asnumpy(dev[3]), cupy.asnumpy(dev[4])
    tag = f"{adv.name} [{backend}]"

    if adv.faulted is None:
        assert np.isnan(got).all(), f"{tag}: a stopped batch must leave every row NaN"
        assert np.array_equal(bits(kc), bits(args[3])), f"{tag}: key_cache changed"
        assert np.array_equal(bits(vc), bits(args[4])), f"{tag}: value_cache changed"
    else:
        valid = [b for b in range(len(args[6])) if b not in adv.faulted]
        rows, ref, ref_kc, ref_vc, written = reference_valid(args, kwargs, valid)
        cum = args[5].astype(np.int64)
        for b in adv.faulted:
            assert np.isnan(got[cum[b]:cum[b + 1]]).all(), f"{tag}: rows of {b} not NaN"
        assert np.isfinite(got[rows]).all(), f"{tag}: a valid row is not finite"
        err = rel_err(got[rows], ref)
        assert err <= OUT_TOL[dtype], f"{tag}: valid rows off by {err:.3e}"
        for name, d, orig, want in (("key_cache", kc, args[3], ref_kc),
                                    ("value_cache", vc, args[4], ref_vc)):
            assert np.array_equal(bits(d[~written]), bits(orig[~written])), \
                f"{tag}: {name} changed outside the valid sequences' slots"
            close = np.allclose(d[written].astype(np.float32), want[written],
                                rtol=K_RTOL[dtype], atol=K_RTOL[dtype])
            assert close, f"{tag}: {name} written slots differ from the reference"

    with pytest.raises(MetadataError) as caught:
        cupy_paged.check_errors()
    err = caught.value
    assert (err.fault, err.sequence) == adv.first, f"{tag}: {err}"
    assert err.whole_batch == (adv.faulted is None)
    assert err.sequences == (5 if adv.faulted is None else len(adv.faulted)) and err.calls == 1
    assert cupy_paged.check_errors() is None, f"{tag}: check_errors did not clear the word"


@pytest.mark.parametrize("adv", ADVERSARIAL, ids=lambda a: a.name)
def test_guard_validate_raises_before_launch(adv):
    import cupy

    clean, kwargs = base_inputs("float16")
    args, hints = mutate(adv, clean)
    dev = to_device(args)
    with pytest.raises(ValueError):
        cupy_paged.paged_attention(*dev, **kwargs, **hints, backend="mea", validate=True)
    assert np.array_equal(bits(cupy.asnumpy(dev[3])), bits(args[3])), "caches were written"
    assert cupy_paged.check_errors() is None


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_guard_passes_valid_metadata(backend, dtype):
    """No fault, no NaN, no word: the guard is invisible on valid input (and on a bad id in a
    column no position reaches, which only the host check rejects)."""
    import cupy

    args, kwargs = base_inputs(dtype, seed=3)
    args[7] = args[7].copy()
    args[7][2, 8] = 10**6       # sequence 2 ends at position 3: column 8 is never read
    dev = to_device(args)
    _, problem = problem_of(dev, kwargs, {})
    assert host_verdict(problem, *args[5:8]) == ("block_id", 2)
    out = cupy_paged.paged_attention(*dev, **kwargs, backend=backend)
    rows, ref, *_ = reference_valid(args, kwargs, list(range(5)))
    got = cupy.asnumpy(out).astype(np.float32)
    assert np.isfinite(got).all() and rel_err(got[rows], ref) <= OUT_TOL[dtype]
    assert cupy_paged.check_errors() is None


# ---------------------------------------------------------------- host and device agree


def _random_metadata(rng, B, bs, max_blocks, num_blocks):
    q = rng.integers(0, 4, B)
    q[0] = max(q[0], 1)
    past = rng.integers(0, max_blocks * bs - 3, B)
    cum = np.concatenate([[0], np.cumsum(q)]).astype(np.int32)
    table = rng.integers(-1, num_blocks, (B, max_blocks)).astype(np.int32)
    return cum, past.astype(np.int32), table


def _corrupt(rng, kind, cum, past, table, num_blocks):
    """Fault ``kind`` (0..6) at a random place; a bad block id only in a column the sequence
    uses (the host checks every column, the guard the used ones: apply kind 2 last)."""
    B, bs = len(past), 4
    b = int(rng.integers(0, B))
    if kind == 0:
        past[b] = -int(rng.integers(1, 2**31))
    elif kind == 1:
        past[b] = int(rng.integers(table.shape[1] * bs - 2, 2**31))
    elif kind == 2:
        end = int(past[b]) + int(cum[b + 1] - cum[b])
        cols = min(-(-max(end, 0) // bs), table.shape[1])
        if cols:
            table[b, int(rng.integers(0, cols))] = rng.choice(
                [-2, -2**31, num_blocks, 2**31 - 1])
    elif kind == 3:
        j = int(rng.integers(0, B + 1))
        cum[j] = min(max(int(cum[j]) + int(rng.integers(-3, 4)), -2**31), 2**31 - 1)
    elif kind == 4:
        cum[int(rng.integers(0, B + 1))] = int(rng.integers(-2**31, 2**31))
    elif kind == 5:
        past[b] = 40 + int(rng.integers(0, 20))   # rotary: cos has 40 rows
    return cum, past, table


def test_guard_agrees_with_the_host_checks():
    """On the adversarial set and 300 random corruptions: the guard faults iff the host check
    raises, its fault array equals the NumPy mirror bit for bit, and check_errors names the
    kind (and, for per-sequence kinds, the sequence) the host names first."""
    import cupy

    cases = []
    clean, kwargs = base_inputs("float16")
    for adv in ADVERSARIAL:
        args, hints = mutate(adv, clean)
        cases.append((adv.name, args, kwargs, hints))
    rng = np.random.default_rng(2024)
    N, Nkv, H, bs, max_blocks, num_blocks = 2, 1, 8, 4, 6, 10
    for i in range(300):
        B = int(rng.integers(1, 7))
        cum, past, table = _random_metadata(rng, B, bs, max_blocks, num_blocks)
        T = int(cum[-1])
        kinds = sorted(rng.integers(0, 7, int(rng.integers(0, 3))), key=lambda k: k == 2)
        for kind in kinds:
            cum, past, table = _corrupt(rng, int(kind), cum, past, table, num_blocks)
        args = [zeros(T, N * H), zeros(T, Nkv * H), zeros(T, Nkv * H),
                zeros(num_blocks, bs, Nkv, H), zeros(num_blocks, bs, Nkv, H), cum, past, table,
                zeros(40, H // 2), zeros(40, H // 2)]
        kw = {"num_heads": N, "kv_num_heads": Nkv, "do_rotary": bool(i % 2)}
        hints = {}
        if i % 5 == 0:
            q = np.diff(cum.astype(np.int64))
            ends = past.astype(np.int64) + q
            hints = {"max_seqlen_q": max(int(q.max()) - int(rng.integers(0, 2)), 0),
                     "max_seqlen_k": max(int(ends.max()) - int(rng.integers(0, 2)), 0),
                     "total_kv_tokens": max(int(ends.sum()) - int(rng.integers(0, 2)), 0)}
        cases.append((f"random{i}", args, kw, hints))

    for name, args, kw, hints in cases:
        problem, fault, out, word = run_guard(to_device(args), kw, hints)
        expect = mirror(problem, *args[5:8])
        assert np.array_equal(fault, expect), f"{name}: fault {fault} != mirror {expect}"
        host = host_verdict(problem, *args[5:8])
        device = _guard.error_from_word(word)
        assert (host is None) == (device is None), f"{name}: host {host}, device {device}"
        if device is not None:
            assert device.fault == host[0], f"{name}: host {host}, device {device}"
            if host[1] is not None:
                assert device.sequence == host[1], f"{name}: host {host}, device {device}"
            faulted_rows = np.zeros(problem.num_tokens, dtype=bool)
            cum = args[5].astype(np.int64)
            for b in np.flatnonzero(fault[:-1]):
                faulted_rows[max(cum[b], 0):max(cum[b + 1], 0)] = True
            if fault[-1]:
                faulted_rows[:] = True
            assert np.isnan(out[faulted_rows]).all() and not np.isnan(out[~faulted_rows]).any()
            with pytest.raises(MetadataError):
                cupy_paged.check_errors()
    cupy.cuda.Device().synchronize()


# ---------------------------------------------------------------- graphs, streams, scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_guard_in_a_cuda_graph(backend):
    """A faulting call captured in a graph: each replay NaNs the faulted rows, keeps the valid
    ones, counts one more faulting call; a valid call afterwards on the stream faults nothing."""
    import cupy

    clean, kwargs = base_inputs("float16")
    args, _ = mutate(ADVERSARIAL[0], clean)        # past_negative: sequence 1 stopped
    info = info_of(clean)
    hints = {"max_seqlen_q": 4, "max_seqlen_k": 21, "total_kv_tokens": info.total}
    dev = to_device(args)
    rows, ref, *_ = reference_valid(args, kwargs, [0, 2, 3, 4])
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        out = cupy_paged.paged_attention(*dev, **kwargs, **hints, backend=backend)  # warm
        stream.synchronize()
        with pytest.raises(MetadataError):
            cupy_paged.check_errors()
        stream.begin_capture()
        cupy_paged.paged_attention(*dev, **kwargs, **hints, backend=backend, out=out)
        graph = stream.end_capture()
        for _ in range(2):
            out.fill(7.0)
            graph.launch(stream)
        stream.synchronize()
    got = cupy.asnumpy(out).astype(np.float32)
    assert np.isnan(got[3:4]).all() and rel_err(got[rows], ref) <= OUT_TOL["float16"]
    with pytest.raises(MetadataError) as caught:
        cupy_paged.check_errors()
    assert (caught.value.fault, caught.value.sequence, caught.value.calls) == ("past", 1, 2)
    with stream:
        good = cupy_paged.paged_attention(*to_device(clean), **kwargs, **hints, backend=backend)
        stream.synchronize()
    assert np.isfinite(cupy.asnumpy(good).astype(np.float32)).all()
    assert cupy_paged.check_errors() is None


def test_guard_on_two_streams_keeps_verdicts_apart():
    import cupy

    clean, kwargs = base_inputs("float16")
    bad, _ = mutate(ADVERSARIAL[3], clean)         # block_id_num_blocks: sequence 2 stopped
    streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(2)]
    outs = []
    for _ in range(5):
        for args, stream in zip((bad, clean), streams):
            with stream:
                outs.append(cupy_paged.paged_attention(*to_device(args), **kwargs,
                                                       backend="mea"))
    for stream in streams:
        stream.synchronize()
    for i, out in enumerate(outs):
        got = cupy.asnumpy(out).astype(np.float32)
        if i % 2 == 0:
            assert np.isnan(got[4:8]).all() and np.isfinite(got[:4]).all(), f"call {i}"
        else:
            assert np.isfinite(got).all(), f"call {i}: the valid stream saw a verdict"
    with pytest.raises(MetadataError) as caught:
        cupy_paged.check_errors()
    assert caught.value.calls == 5 and caught.value.sequence == 2


def test_validate_raises_a_stale_device_fault():
    """validate=True waits for the GPU and raises what the guard recorded since the last
    check, even from an earlier unvalidated call."""
    clean, kwargs = base_inputs("float16")
    bad, _ = mutate(ADVERSARIAL[0], clean)
    cupy_paged.paged_attention(*to_device(bad), **kwargs, backend="mea")
    with pytest.raises(MetadataError, match="sequence 1: past_seqlens"):
        cupy_paged.paged_attention(*to_device(clean), **kwargs, backend="mea", validate=True)
    assert cupy_paged.check_errors() is None


def zeros(*shape):
    return np.zeros(shape, np.float16)


def _decode_batch(B, max_blocks, bs=16, num_blocks=1000, seed=0):
    """One new token per sequence, N = Nkv = 1, H = 8; random pasts within the table."""
    rng = np.random.default_rng(seed)
    cum = np.arange(B + 1, dtype=np.int32)
    past = rng.integers(0, max_blocks * bs - 1, B).astype(np.int32)
    table = rng.integers(-1, num_blocks, (B, max_blocks)).astype(np.int32)
    return [zeros(B, 8), zeros(B, 8), zeros(B, 8), zeros(num_blocks, bs, 1, 8),
            zeros(num_blocks, bs, 1, 8), cum, past, table, None, None], {"num_heads": 1,
                                                                         "kv_num_heads": 1}


def test_guard_walks_past_the_grid_and_long_tables():
    """B = 140000 sequences (more than MAX_GRID blocks of 4 warps: grid-stride) and a table of
    40000 columns whose last used column holds the only bad id."""
    import cupy

    args, kw = _decode_batch(140000, 4)
    args[6][139999] = -1
    args[7][70001, 0] = 1000
    problem, fault, out, word = run_guard(to_device(args), kw, {})
    assert np.array_equal(fault, mirror(problem, *args[5:8]))
    assert set(np.flatnonzero(fault)) == {70001, 139999}
    err = _guard.error_from_word(word)
    assert (err.fault, err.sequence, err.sequences) == ("past", 139999, 2)
    assert np.isnan(out[[70001, 139999]]).all()
    assert not np.isnan(np.delete(out, [70001, 139999], axis=0)).any()
    with pytest.raises(MetadataError):
        cupy_paged.check_errors()

    args, kw = _decode_batch(8, 40000, num_blocks=50000)
    args[6][5] = 40000 * 16 - 1                     # uses every column
    args[7][5, 39999] = 50000
    problem, fault, _, word = run_guard(to_device(args), kw, {})
    assert list(np.flatnonzero(fault)) == [5]
    assert _guard.error_from_word(word).values == (39999, 50000)
    with pytest.raises(MetadataError):
        cupy_paged.check_errors()
    cupy.cuda.Device().synchronize()


def test_guard_cost_is_small():
    """Informational (printed; -s): device and host time of the guard for decode B = 4096 with
    256 used columns each, and B = 64 with 16k columns each."""
    import cupy

    for B, cols in ((4096, 256), (64, 16384)):
        args, kw = _decode_batch(B, cols)
        args[6][:] = cols * 16 - 1
        dev = to_device(args)
        a, problem = problem_of(dev, kw, {})
        out = cupy.empty((B, 8), cupy.float16)
        _guard.run_guard(problem, a, out)
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        cupy.cuda.Device().synchronize()
        reps = 50
        t0 = time.perf_counter()
        start.record()
        for _ in range(reps):
            _guard.run_guard(problem, a, out)
        stop.record()
        host_us = (time.perf_counter() - t0) / reps * 1e6
        stop.synchronize()
        dev_us = cupy.cuda.get_elapsed_time(start, stop) / reps * 1e3
        print(f"\nguard B={B} cols={cols}: {dev_us:.1f} us per call on the GPU, "
              f"{host_us:.1f} us host", end="")
        assert dev_us < 200
    assert cupy_paged.check_errors() is None
