"""The GPU prologue (cuda_src/prologue/prologue.cu, launched by backends/_prologue.py) against the
NumPy reference: QKV unpacking, rotary and the paged cache writes.

CPU: every variant compiles under NVRTC for each arch it supports. GPU: caches equal the
reference's (unwritten slots and V bit-exact, rotated K within one fp16/bf16 rounding), the
rotated Q equals ``reference.apply_rotary`` within one rounding, over fp16/bf16, packed on/off,
rotary none/NeoX/GPT-J/partial, block sizes 1/3/16/256, B in {1, 3, 257}, q_len-0 sequences,
-1 blocks, shuffled tables, and a cache of more than 2^31 elements. Inputs are drawn in float32
and rounded once to the 16-bit dtype on the host; the reference runs on float32 copies.
"""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cupy_paged import _validate
from cupy_paged.backends import _launch, _prologue
from cupy_paged.errors import ToolchainError
from cupy_paged.jit import compile_many, compile_variant
from cupy_paged.reference import apply_rotary, paged_attention_reference, token_positions

try:
    from .paged_cases import Case, make_inputs, seed_of, written_slots
except ImportError:
    from paged_cases import Case, make_inputs, seed_of, written_slots

REPO = Path(__file__).resolve().parents[1]
ARCHS = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90"]
DTYPES = ["float16", "bfloat16"]
ARG_NAMES = ("query", "key", "value", "key_cache", "value_cache", "cumulative_sequence_length",
             "past_seqlens", "block_table", "cos_cache", "sin_cache")
POISON = 0xFFFF  # a NaN in both fp16 and bf16


pytestmark = pytest.mark.usefixtures("cache_dir")  # conftest: a private kernel cache


# ---------------------------------------------------------------- 16-bit data on the host


def enc(x, dtype):
    """float values -> uint16 bits of fp16 / bf16, rounded to nearest even (finite input)."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float16":
        return x.astype(np.float16).view(np.uint16)
    u = x.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def dec(bits, dtype):
    """uint16 bits of fp16 / bf16 -> their exact float32 values."""
    bits = np.asarray(bits, dtype=np.uint16)
    if dtype == "float16":
        return bits.view(np.float16).astype(np.float32)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def ulps(a, b):
    """Distance of two uint16 arrays of one 16-bit float format, in units in the last place."""
    def ordered(x):
        x = np.asarray(x, dtype=np.int32)
        return np.where(x & 0x8000, -(x & 0x7FFF), x & 0x7FFF)
    return np.abs(ordered(a) - ordered(b))


def first_diff(mask, names):
    idx = np.argwhere(mask)[:5].tolist()
    return f"{int(mask.sum())} {names} differ, first at {idx}"


def device_dtype(dtype):
    """The CuPy dtype that carries ``dtype``: bf16 as ml_dtypes.bfloat16 when CuPy takes it,
    else its bits in a float16 array (the kernels only see bits)."""
    import cupy

    if dtype == "float16":
        return np.dtype(np.float16)
    try:
        import ml_dtypes
        cupy.asarray(np.zeros(1, dtype=ml_dtypes.bfloat16))
        return np.dtype(ml_dtypes.bfloat16)
    except (ImportError, TypeError, ValueError):  # no ml_dtypes, or a CuPy without bfloat16
        return np.dtype(np.float16)


def skip_unless_sm(dtype):
    import cupy

    sm = int(cupy.cuda.Device().compute_capability)
    need = _launch.DTYPES[dtype].min_sm
    if sm < need:
        pytest.skip(f"{dtype} kernels need sm{need}, this GPU is sm{sm}")


@dataclasses.dataclass
class Prepared:
    """One case: 16-bit bits (uint16) and int32 metadata on the host, float32 values, kwargs."""

    dtype: str
    bits: dict
    f32: dict
    kwargs: dict
    inp: object


def prepare(case, dtype, seed):
    inp = make_inputs(dataclasses.replace(case, dtype="float32"), np.random.default_rng(seed))
    bits, f32 = {}, {}
    for name, x in zip(ARG_NAMES, inp.args):
        if x is not None and x.dtype.kind == "f":
            bits[name] = enc(x, dtype)
            f32[name] = dec(bits[name], dtype)
        else:
            bits[name] = f32[name] = x
    return Prepared(dtype, bits, f32, inp.kwargs, inp)


def to_device(prep):
    import cupy

    dt = device_dtype(prep.dtype)
    return {name: None if x is None else
            cupy.asarray(x.view(dt) if x.dtype == np.uint16 else x)
            for name, x in prep.bits.items()}


def device_bits(x):
    import cupy

    return cupy.asnumpy(x).view(np.uint16)


def problem_of(a, kwargs, dtype):
    """check_arguments on the device arrays, with the dtype the bits really hold."""
    p = _validate.check_arguments({**a, "out": None}, **kwargs)
    return dataclasses.replace(p, dtype=dtype)


def poison_pool(*nbytes):
    """Leave freed pool blocks of these sizes filled with NaN bits, so the launcher's next
    cupy.empty of that size very likely returns poisoned memory."""
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    blocks = [cupy.full(max(n // 2, 1), POISON, dtype=cupy.uint16) for n in nbytes]
    cupy.cuda.get_current_stream().synchronize()
    del blocks


def expected(prep):
    """(q bits (T, N*H) or None, key_cache bits, value_cache bits) from the NumPy reference."""
    f, kw = prep.f32, prep.kwargs
    kc, vc = f["key_cache"].copy(), f["value_cache"].copy()
    paged_attention_reference(f["query"], f["key"], f["value"], kc, vc,
                              f["cumulative_sequence_length"], f["past_seqlens"],
                              f["block_table"], f["cos_cache"], f["sin_cache"], **kw)
    (T, width), H = f["query"].shape, kc.shape[3]
    N = kw["num_heads"]
    q = f["query"].reshape(T, width // H, H)[:, :N]
    if kw["do_rotary"]:
        _, pos = token_positions(f["cumulative_sequence_length"].astype(np.int64),
                                 f["past_seqlens"].astype(np.int64))
        q = apply_rotary(q, f["cos_cache"][pos], f["sin_cache"][pos], kw["rotary_interleaved"])
    return enc(q.reshape(T, N * H), prep.dtype), enc(kc, prep.dtype), enc(vc, prep.dtype)


def run_and_check(prep, tag):
    """Run the prologue on fresh device copies of ``prep`` and check q and both caches."""
    skip_unless_sm(prep.dtype)
    a = to_device(prep)
    problem = problem_of(a, prep.kwargs, prep.dtype)
    _validate.check_metadata(problem, prep.bits["cumulative_sequence_length"],
                             prep.bits["past_seqlens"], prep.bits["block_table"])
    T, N, H = problem.num_tokens, problem.num_heads, problem.head_size
    poison_pool(T * N * H * 2)
    q = _prologue.run_prologue(problem, a)
    exp_q, exp_kc, exp_vc = expected(prep)
    rotary = prep.kwargs["do_rotary"]

    assert q.shape == (T, N * H) and q.dtype == a["query"].dtype, tag
    if problem.packed or rotary:
        assert q is not a["query"], f"{tag}: q must be a new buffer"
        d = ulps(device_bits(q), exp_q)
        assert d.max(initial=0) <= (1 if rotary else 0), f"{tag}: q: {first_diff(d > 0, 'q')}"
    else:
        assert q is a["query"], f"{tag}: unpacked, unrotated query must be returned as is"

    written = written_slots(prep.inp)
    got_vc = device_bits(a["value_cache"])
    assert np.array_equal(got_vc, exp_vc), \
        f"{tag}: value_cache: {first_diff((got_vc != exp_vc).any(axis=(2, 3)), 'slots')}"
    d = ulps(device_bits(a["key_cache"]), exp_kc).max(axis=(2, 3))
    limit = 1 if rotary else 0
    assert not d[~written].any(), \
        f"{tag}: key_cache: {first_diff(d * ~written > 0, 'unwritten slots')}"
    assert d[written].max(initial=0) <= limit, \
        f"{tag}: key_cache: {first_diff(d * written > limit, 'written slots')}"
    # every written slot really changed (poisoned caches are random, so a skipped write shows)
    orig = prep.bits["value_cache"]
    changed = (got_vc != orig).any(axis=(2, 3))
    assert np.array_equal(changed, written), f"{tag}: {first_diff(changed != written, 'slots')}"
    return problem


# ---------------------------------------------------------------- CPU: NVRTC builds


def buildable(specs):
    """(spec, arch) for every arch in ARCHS the spec supports; plus the archs NVRTC refuses."""
    from cupy_backends.cuda.libs import nvrtc

    supported = nvrtc.getSupportedArchs()
    ok = [(s, a) for s in specs for a in ARCHS if not s.unsupported_reason(a)]
    return ([(s, a) for s, a in ok if int(a[3:]) in supported],
            [(s, a) for s, a in ok if int(a[3:]) not in supported])


def assert_cubins(results, cache_dir):
    for r in results:
        data = r.path.read_bytes()
        assert data[:4] == b"\x7fELF", f"{r.path} is not a cubin"
        assert r.name.encode() in data, f"extern \"C\" {r.name} missing from {r.path.name}"
        assert r.path.parent == cache_dir


def compile_every_arch(specs, cache_dir):
    """Build every (spec, arch) NVRTC supports into cache_dir and check the cubins; the archs
    it refuses (NVRTC 13 dropped sm_70) must raise ToolchainError naming the arch. Returns the
    (spec, arch) pairs built."""
    build, refused = buildable(specs)
    results = compile_many(build)
    assert [(r.name, r.arch) for r in results] == [(s.name, a) for s, a in build]
    assert_cubins(results, cache_dir)
    for spec, arch in refused:
        with pytest.raises(ToolchainError, match=f"cannot build {arch}"):
            compile_variant(spec, arch)
    return build


def test_prologue_variants_compile_for_every_arch(cache_dir):
    build = compile_every_arch(_prologue.SPECS, cache_dir)
    assert {s.name for s, _ in build} == {"prologue_f16", "prologue_bf16"}


def test_prologue_bf16_compile_refuses_before_sm80():
    with pytest.raises(ValueError, match="needs sm_80"):
        compile_variant("prologue_bf16", "sm_75")
    assert _prologue.prologue_name("bfloat16") == "prologue_bf16"
    assert _prologue.prologue_name("float16") == "prologue_f16"


def test_launchers_import_without_cupy():
    code = ("import sys, cupy_paged.backends._prologue, cupy_paged.backends._gather; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('cupy', 'cupy_backends')]")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_bit_helpers():
    x = np.array([0.0, -0.0, 1.0, -2.5, 1 + 2**-8, 1 + 3 * 2**-8, 65504.0], dtype=np.float32)
    assert np.array_equal(dec(enc(x, "float16"), "float16"), x.astype(np.float16))
    b = enc(x, "bfloat16")
    assert b.tolist()[:4] == [0x0000, 0x8000, 0x3F80, 0xC020]
    assert b[4] == 0x3F80 and b[5] == 0x3F82  # ties to even: 1+2^-8 down, 1+3*2^-8 up
    assert ulps(np.uint16([0x0000, 0x3C00]), np.uint16([0x8001, 0x3C01])).tolist() == [1, 1]


# ---------------------------------------------------------------- GPU: against the reference

ROTARY = [("none", 0), ("neox", 0), ("gptj", 0), ("neox", 12), ("gptj", 12), ("neox", 16)]
ROTARY_IDS = ["norot", "neox", "gptj", "neox-R12", "gptj-R12", "neox-R16"]


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 3, 257])
@pytest.mark.parametrize("bs", [1, 3, 16, 256])
@pytest.mark.parametrize("rotary,R", ROTARY, ids=ROTARY_IDS)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prologue_matches_reference(dtype, packed, rotary, R, bs, B):
    # H = 32: R = 12 rotates 1.5 chunks (R/2 = 6: scalar partners), R = 16 half a head (R/2 = 8:
    # vector partners), R = 32 the whole head. B = 1 draws a chunk (q_len >= 2); else q_len 0..5.
    case = Case(f"prologue-{dtype}-{packed}-{rotary}{R}-bs{bs}-B{B}", B=B, N=4, Nkv=2, H=32,
                bs=bs, packed=packed, rotary=rotary, R=R, mode="chunk" if B == 1 else "mixed",
                holes=1 + B // 16, spare=3, extra_cols=2)
    seed = seed_of(case.name)
    prep = prepare(case, dtype, seed)
    lens = list(zip(prep.inp.q_lens, prep.inp.pasts, strict=True))
    run_and_check(prep, f"[{case.name} seed={seed} (q_len, past)={lens}]")


HEAD_CASES = [(8, 3, 1), (40, 6, 3), (128, 8, 2), (256, 5, 5)]  # (H, N, Nkv)


@pytest.mark.gpu
@pytest.mark.parametrize("H,N,Nkv", HEAD_CASES, ids=[f"H{h}-N{n}-Nkv{k}" for h, n, k in HEAD_CASES])
@pytest.mark.parametrize("rotary,part", [("neox", 1), ("gptj", 1), ("neox", 2), ("gptj", 4)],
                         ids=["neox", "gptj", "neox-half", "gptj-quarter"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prologue_head_sizes(dtype, rotary, part, H, N, Nkv):
    R = max(2, (H // part) // 2 * 2)
    case = Case(f"heads-{dtype}-{rotary}-R{R}-H{H}-N{N}-Nkv{Nkv}", B=4, N=N, Nkv=Nkv, H=H, bs=5,
                packed=(H // 8 + part) % 2 == 1, rotary=rotary, R=R if R < H else 0,
                mode="chunk", holes=1)
    seed = seed_of(case.name)
    run_and_check(prepare(case, dtype, seed), f"[{case.name} seed={seed}]")


EDGE_CASES = [
    Case("qlen0-ends", lens=((0, 5), (3, 0), (0, 0), (4, 17), (0, 3)), bs=3, rotary="gptj"),
    Case("T0-packed-rotary", lens=((0, 4), (0, 0)), packed=True, rotary="neox"),
    Case("T0-split", lens=((0, 7),)),
    Case("unmapped-row", mode="chunk", unmapped=(1,), bs=4, rotary="neox"),
    Case("unmapped-all", lens=((2, 3), (1, 0)), unmapped=(0, 1), packed=True),
    Case("cross-bs256", lens=((300, 200), (0, 17), (5, 511)), bs=256, N=2, Nkv=1,
         packed=True, rotary="neox"),
    Case("capacity-bs3", lens=((3, 3), (1, 2), (0, 3)), bs=3, rotary="gptj"),
    Case("shared-prefix", mode="shared", share=2, bs=3, B=6, rotary="neox"),
    Case("overprovisioned", mode="mixed", spare=200, extra_cols=10, bs=4, packed=True),
    Case("decode-long-bs1", lens=tuple((1, 40 + 7 * i) for i in range(6)), bs=1, rotary="gptj"),
    Case("prefill-long", lens=((700, 0), (1, 0)), bs=16, N=2, Nkv=1, rotary="neox"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", EDGE_CASES, ids=[c.name for c in EDGE_CASES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prologue_edge_cases(dtype, case):
    seed = seed_of(case.name + dtype)
    run_and_check(prepare(case, dtype, seed), f"[{case.name} {dtype} seed={seed}]")


@pytest.mark.gpu
def test_prologue_unvalidated_metadata_stays_in_bounds():
    """Data validate=True rejects (a block id >= num_blocks, positions past cos rows): the
    kernel writes nothing there and marks such tokens' q rows NaN, touching nothing else."""
    import cupy

    case = Case("bad-metadata", lens=((4, 6), (3, 0), (2, 9)), bs=4, rotary="neox", spare=2)
    prep = prepare(case, "float16", seed_of(case.name))
    table, past, cum = (prep.bits[n] for n in ("block_table", "past_seqlens",
                                                "cumulative_sequence_length"))
    cos_rows = 10  # sequence 2 (positions 9, 10) and 0 (position 9) reach past it
    exp_q, exp_kc, exp_vc = expected(prep)
    _, pos = token_positions(cum.astype(np.int64), past.astype(np.int64))
    keep_k, keep_v = prep.bits["key_cache"], prep.bits["value_cache"]
    for t, p in enumerate(pos):
        b = int(np.searchsorted(cum, t, side="right") - 1)
        blk = table[b, p // 4]
        if p >= cos_rows or b == 1:
            exp_kc[blk, p % 4], exp_vc[blk, p % 4] = keep_k[blk, p % 4], keep_v[blk, p % 4]
    a = to_device(prep)
    a["block_table"][1, 0] = prep.inp.args[3].shape[0] + 5
    a["cos_cache"], a["sin_cache"] = a["cos_cache"][:cos_rows], a["sin_cache"][:cos_rows]
    problem = problem_of(a, prep.kwargs, "float16")
    q = _prologue.run_prologue(problem, a)
    got_q = cupy.asnumpy(q).astype(np.float32)
    nan_rows = np.isnan(got_q).all(axis=1)
    assert nan_rows.tolist() == (pos >= cos_rows).tolist()
    assert np.array_equal(device_bits(q)[~nan_rows], exp_q[~nan_rows])
    assert np.array_equal(device_bits(a["key_cache"]), exp_kc)
    assert np.array_equal(device_bits(a["value_cache"]), exp_vc)


@pytest.mark.gpu
def test_prologue_rejects_misaligned_arrays():
    import cupy

    prep = prepare(Case("misaligned", lens=((2, 1),)), "float16", 1)
    a = to_device(prep)
    flat = cupy.empty(a["query"].size + 1, dtype=a["query"].dtype)[1:]
    a["query"] = flat.reshape(a["query"].shape)
    problem = problem_of(a, prep.kwargs, "float16")
    with pytest.raises(ValueError, match="query: .*16-byte aligned"):
        _prologue.run_prologue(problem, a)


@pytest.mark.gpu
def test_prologue_on_a_side_stream():
    """The launch goes to the current stream: run on a non-blocking stream, check after its sync."""
    import cupy

    prep = prepare(Case("stream", mode="chunk", B=5, rotary="gptj", packed=True), "float16", 7)
    a = to_device(prep)
    problem = problem_of(a, prep.kwargs, "float16")
    cupy.cuda.get_current_stream().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        q = _prologue.run_prologue(problem, a)
        got_q, got_kc = device_bits(q), device_bits(a["key_cache"])  # asnumpy on this stream
    exp_q, exp_kc, _ = expected(prep)
    assert ulps(got_q, exp_q).max() <= 1 and ulps(got_kc, exp_kc).max() <= 1


@pytest.mark.gpu
def test_prologue_cache_over_2_31_elements():
    """17000 blocks x 256 x 8 x 64 fp16 = 2.23e9 elements (4.5 GB) per cache: tokens written at
    element offset 2^31 (block 16384) and at the far end (block 16999) land right, and nothing
    else changes."""
    import cupy

    num_blocks, bs, Nkv, H, N = 17000, 256, 8, 64, 8
    free = cupy.cuda.Device().mem_info[0]
    if free < 16 * 2**30:
        pytest.skip(f"needs 16 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    try:
        kc = cupy.empty((num_blocks, bs, Nkv, H), dtype=cupy.float16)
        vc = cupy.empty_like(kc)
        kc.view(cupy.uint16).fill(POISON)
        vc.view(cupy.uint16).fill(POISON)
        assert kc.size > 2**31
        rng = np.random.default_rng(17000)
        q_lens, past = [6, 3], [506, 0]   # sequence 0: positions 506..511 = block 16999, 250..255
        table = np.array([[7, 16999], [16384, -1]], dtype=np.int32)
        T = sum(q_lens)
        host = {
            "query": enc(rng.standard_normal((T, N * H)), "float16"),
            "key": enc(rng.standard_normal((T, Nkv * H)), "float16"),
            "value": enc(rng.standard_normal((T, Nkv * H)), "float16"),
            "cos_cache": enc(rng.uniform(-1, 1, (520, H // 2)), "float16"),
            "sin_cache": enc(rng.uniform(-1, 1, (520, H // 2)), "float16"),
        }
        a = {name: cupy.asarray(x.view(np.float16)) for name, x in host.items()}
        a.update(key_cache=kc, value_cache=vc, block_table=cupy.asarray(table),
                 cumulative_sequence_length=cupy.asarray(np.array([0, 6, 9], dtype=np.int32)),
                 past_seqlens=cupy.asarray(np.array(past, dtype=np.int32)))
        kwargs = {"num_heads": N, "kv_num_heads": Nkv, "scale": 0.0, "softcap": 0.0,
                  "local_window_size": -1, "do_rotary": True, "rotary_interleaved": False}
        problem = problem_of(a, kwargs, "float16")
        _prologue.run_prologue(problem, a)

        pos = np.array([506, 507, 508, 509, 510, 511, 0, 1, 2])
        k = dec(host["key"], "float16").reshape(T, Nkv, H)
        k_rot = enc(apply_rotary(k, dec(host["cos_cache"], "float16")[pos],
                                 dec(host["sin_cache"], "float16")[pos], False), "float16")
        v = host["value"].reshape(T, Nkv, H)
        for blk, offs, rows in ((16999, slice(250, 256), slice(0, 6)),
                                (16384, slice(0, 3), slice(6, 9))):
            assert ulps(device_bits(kc[blk, offs]), k_rot[rows]).max() <= 1, blk
            assert np.array_equal(device_bits(vc[blk, offs]), v[rows]), blk
        written = T * Nkv * H
        for cache in (kc, vc):
            assert int(cupy.count_nonzero(cache.view(cupy.uint16) != POISON)) == written
    finally:
        kc = vc = a = None
        cupy.get_default_memory_pool().free_all_blocks()
