"""The mea backend's paged fMHA kernel (cuda_src/mea/fmha_paged.cuh, backends/_mea_kernels.py).

CPU: the tile policy, and NVRTC compiles of every instantiation `auto` picks on sm_80 and of each
arch tag for each SM from sm_70 to sm_90, into a fresh cache under tmp_path (compile seconds are
printed; run with -s to see them). GPU: launch_fmha against paged_attention_reference on float32
copies of the same fp16/bf16 values, outputs poisoned with NaN before each launch.
"""
import dataclasses
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from cupy_paged._validate import Problem
from cupy_paged.backends import _mea_kernels as mk
from cupy_paged.backends._launch import DTYPES as GPU_DTYPES
from cupy_paged.errors import ToolchainError
from cupy_paged.jit import compile_many, compile_variant, get_spec
from cupy_paged.reference import paged_attention_reference

REPO = Path(__file__).resolve().parents[1]
ARCHS = (70, 75, 80, 86, 89, 90)
DTYPES = ("float16", "bfloat16")
ELF_MAGIC = b"\x7fELF"


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One fresh cache for this module's compile tests: a variant two tests need builds once."""
    return tmp_path_factory.mktemp("mea_compile_cache")


@pytest.fixture
def cache_dir(compile_cache, monkeypatch):
    monkeypatch.setenv("CUPY_PAGED_CACHE_DIR", str(compile_cache))
    return compile_cache


def nvrtc_archs():
    from cupy_backends.cuda.libs import nvrtc

    return set(nvrtc.getSupportedArchs())


def assert_cubin(result):
    data = result.path.read_bytes()
    assert data[:4] == ELF_MAGIC, f"{result.path} is not an ELF cubin"
    assert result.name.encode() in data, f"entry {result.name} missing from the cubin"
    assert f"{result.name}_launch_info".encode() in data, "launch_info global missing"


# ---------------------------------------------------------------- policy (no NVRTC)


@pytest.mark.parametrize("sm,tag", [(50, 50), (61, 50), (70, 70), (72, 70), (75, 75),
                                    (80, 80), (86, 80), (89, 80), (90, 80), (120, 80)])
def test_arch_tag(sm, tag):
    assert mk.arch_tag(sm) == tag


def test_arch_tag_below_sm50_is_refused():
    with pytest.raises(ValueError, match="sm_50 or newer"):
        mk.arch_tag(35)


# xformers/PyTorch's forward tiles: first whose max_k covers H (64x128 only on Sm80)
@pytest.mark.parametrize("sm,head,tile", [
    (80, 32, (64, 64, 64)), (90, 64, (64, 64, 64)), (86, 80, (64, 128, 128)),
    (80, 128, (64, 128, 128)), (89, 160, (32, 128, 1 << 16)), (90, 256, (32, 128, 1 << 16)),
    (75, 64, (64, 64, 64)), (75, 96, (32, 128, 128)), (75, 192, (32, 128, 1 << 16)),
    (70, 128, (32, 128, 128)), (50, 40, (64, 64, 64)), (50, 256, (32, 128, 1 << 16)),
])
def test_choose_tile(sm, head, tile):
    assert mk.choose_tile(sm, head) == tile


def test_variant_names():
    assert mk.variant_name("float16", 90, 128) == "mea_fwd_f16_sm80_q64_k128_h128"
    assert mk.variant_name("bfloat16", 86, 256) == "mea_fwd_bf16_sm80_q32_k128_h65536"
    assert mk.variant_name("float16", 75, 40) == "mea_fwd_f16_sm75_q64_k64_h64"
    with pytest.raises(ValueError, match="bfloat16 needs the Sm80"):
        mk.variant_name("bfloat16", 75, 64)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        mk.variant_name("float32", 80, 64)
    names = mk.all_variant_names()
    assert len(names) == len(set(names)) == 15  # f16 x 4 tags x 3 tiles + bf16 x Sm80 x 3
    for name in names:
        spec = get_spec(name)
        assert spec.min_arch == int(name.split("_sm")[1].split("_")[0]) and spec.cutlass


def make_problem(T=5, B=2, N=4, Nkv=2, H=64, bs=16, max_blocks=8, dtype="float16",
                 scale=0.0, softcap=0.0, window=-1):
    return Problem(num_tokens=T, batch=B, num_heads=N, kv_num_heads=Nkv, head_size=H,
                   block_size=bs, num_blocks=64, max_blocks=max_blocks, packed=False,
                   dtype=dtype, scale=scale or 1.0 / math.sqrt(H), softcap=softcap,
                   window=window, do_rotary=False, rotary_interleaved=False, rotary_dim=0,
                   cos_rows=0)


def test_workspace_elements():
    for tag in mk.ARCH_TAGS:  # the workspace rule must not depend on the arch
        assert [t[2] > 128 for t in mk.tiles(tag)] == [False, False, True]
    assert mk.workspace_elements(make_problem(H=128)) == 0
    assert mk.workspace_elements(make_problem(T=7, N=6, H=160)) == 7 * 6 * 160


def test_mea_module_imports_without_cupy():
    code = ("import sys, cupy_paged.backends._mea_kernels as m; m.all_variant_names(); "
            "assert not [n for n in sys.modules if n.split('.')[0] in ('cupy', 'cupy_backends')]")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# ---------------------------------------------------------------- NVRTC compiles (CPU)


def test_mea_auto_variants_compile_for_sm80(cache_dir):
    names = sorted({mk.variant_name(d, 80, h) for d in DTYPES for h in range(8, 257, 8)})
    assert len(names) == 6
    results = compile_many([(n, "sm_80") for n in names], jobs=2)
    for r in results:
        print(f"\n{r.name} for {r.arch}: {r.seconds:.1f} s{' (cached)' * r.cached}", end="")
        assert r.path.parent == cache_dir
        assert_cubin(r)


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
def test_mea_compile_each_arch_tag(arch, cache_dir):
    """Each arch tag the SM can run, f16; the tile rotates with the SM so all three get built."""
    heads = (64, 128, 256)  # one head size per tile, in tiles() order
    items = [(mk.variant_name("float16", tag, heads[(ARCHS.index(arch) + i) % 3]), f"sm_{arch}")
             for i, tag in enumerate(t for t in mk.ARCH_TAGS if t <= arch)]
    assert len(items) == sum(t <= arch for t in mk.ARCH_TAGS)
    if arch not in nvrtc_archs():  # NVRTC 13 dropped sm_70
        for name, a in items:
            with pytest.raises(ToolchainError, match=f"cannot build sm_{arch}"):
                compile_variant(name, a)
        return
    for r in compile_many(items, jobs=2):
        print(f"\n{r.name} for {r.arch}: {r.seconds:.1f} s{' (cached)' * r.cached}", end="")
        assert_cubin(r)


def test_mea_bf16_below_sm80_is_not_built():
    name = mk.variant_name("bfloat16", 80, 64)
    with pytest.raises(ValueError, match="needs sm_80 or newer"):
        compile_variant(name, "sm_75")


# ---------------------------------------------------------------- GPU parity

HEADS = (32, 40, 64, 80, 96, 128, 160, 192, 256)
HEAD_PAIRS = ((6, 6), (6, 3), (8, 1), (32, 8))
BLOCK_SIZES = (1, 16, 256)
WINDOWS = (-1, 1, 7, 100)
CAPS = ((0.0, 0.0), (1.0, 0.7), (50.0, 0.7), (0.0, 0.3))  # (softcap, scale); 0 = 1/sqrt(H)
MODES = ("decode", "prefill", "mixed")
RUNS = (("float16", 80), ("bfloat16", 80), ("float16", 75), ("float16", 70), ("float16", 50))
TOL = {"float16": 2e-3, "bfloat16": 1.6e-2}


@dataclasses.dataclass(frozen=True)
class MeaCase:
    dtype: str
    tag: int       # arch tag forced through launch_fmha's sm
    H: int
    N: int
    Nkv: int
    bs: int
    W: int
    softcap: float
    scale: float
    mode: str
    packed: bool   # q read from a packed QKV row: row stride (N + 2 Nkv) H

    @property
    def id(self):
        cap = f"_cap{self.softcap:g}" if self.softcap > 0 else ""
        return (f"mea_{GPU_DTYPES[self.dtype].short}_sm{self.tag}_h{self.H}_n{self.N}x{self.Nkv}"
                f"_bs{self.bs}_w{self.W}{cap}_s{self.scale:g}_{self.mode}"
                f"{'_packed' if self.packed else ''}")


def matrix():
    """Every head size per (dtype, forced tag); the other axes rotate with coprime periods."""
    cases, i = [], 0
    for dtype, tag in RUNS:
        for H in HEADS:
            cases.append(MeaCase(dtype, tag, H, *HEAD_PAIRS[i % 4], BLOCK_SIZES[i % 3],
                                 WINDOWS[(i // 3) % 4], *CAPS[(i // 2) % 4], MODES[(i // 2) % 3],
                                 i % 5 == 0))
            i += 1
    return cases


CASES = matrix()


def test_mea_matrix_covers_every_axis():
    for axis, values in (("H", HEADS), ("bs", BLOCK_SIZES), ("W", WINDOWS), ("mode", MODES)):
        assert {getattr(c, axis) for c in CASES} == set(values), axis
    assert {(c.N, c.Nkv) for c in CASES} == set(HEAD_PAIRS)
    assert {(c.softcap, c.scale) for c in CASES} == set(CAPS)
    assert {(c.dtype, c.tag) for c in CASES} == set(RUNS) and any(c.packed for c in CASES)


def to_device_bits(x, dtype):
    """float32 values -> (stored array, float32 of exactly what is stored). bf16 travels as
    its uint16 bits (round to nearest even), so no bfloat16 dtype is needed on either side."""
    if dtype == "float16":
        h = x.astype(np.float16)
        return h, h.astype(np.float32)
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    b = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return b, (b.astype(np.uint32) << 16).view(np.float32)


def from_device_bits(a, dtype):
    if dtype == "float16":
        return a.astype(np.float32)
    return (a.astype(np.uint32) << 16).view(np.float32)


NAN_BITS = {"float16": np.float16(np.nan), "bfloat16": np.uint16(0x7FC0)}


def draw_lens(mode, rng):
    if mode == "decode":
        lens = [(1, int(rng.integers(0, 700))) for _ in range(5)]
    elif mode == "prefill":
        lens = [(int(rng.integers(1, 150)), 0) for _ in range(3)]
    else:
        lens = [(int(rng.integers(1, 80)), int(rng.integers(0, 300))) for _ in range(4)]
    lens.insert(1, (0, int(rng.integers(0, 40))))  # a q_len-0 sequence mid-batch
    lens.append((3, 20))                           # its whole block_table row is -1
    return lens


@dataclasses.dataclass
class Inputs:
    problem: Problem
    lens: list
    table: np.ndarray
    q32: np.ndarray        # (T, N, H) float32 of the stored values
    kc32: np.ndarray       # (num_blocks, bs, Nkv, H)
    vc32: np.ndarray
    q_dev: np.ndarray      # stored bits, (T, width) with the query in the first N*H columns
    kp_dev: np.ndarray     # packed (rows, Nkv, H) stored bits
    vp_dev: np.ndarray
    cu_q: np.ndarray
    cu_k: np.ndarray


def make_inputs(case, rng):
    N, Nkv, H, bs = case.N, case.Nkv, case.H, case.bs
    lens = draw_lens(case.mode, rng)
    B = len(lens)
    need = [-(-(q + p) // bs) for q, p in lens]
    num_blocks = sum(need) + 3                         # spare blocks nobody reads
    ids = iter(rng.permutation(num_blocks))            # shuffled, non-contiguous
    max_blocks = max(need) + 1
    table = np.full((B, max_blocks), -1, dtype=np.int32)
    for b in range(B - 1):
        table[b, :need[b]] = [next(ids) for _ in range(need[b])]
        holes = need[b] // 8 + (need[b] >= 3 and rng.random() < 0.5)
        table[b, rng.choice(need[b], size=min(holes, need[b]), replace=False)] = -1
        table[b, need[b]:] = rng.integers(-1, num_blocks, max_blocks - need[b])  # never read

    kc, kc32 = to_device_bits(rng.standard_normal((num_blocks, bs, Nkv, H)), case.dtype)
    vc, vc32 = to_device_bits(rng.standard_normal((num_blocks, bs, Nkv, H)), case.dtype)
    T = sum(q for q, _ in lens)
    width = (N + 2 * Nkv) * H if case.packed else N * H
    q_dev, q_all32 = to_device_bits(rng.standard_normal((T, width)), case.dtype)
    q32 = q_all32[:, :N * H].reshape(T, N, H)

    kv_lens = [q + p for q, p in lens]
    cu_k = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    kp_dev = np.zeros((int(cu_k[-1]), Nkv, H), dtype=kc.dtype)
    vp_dev = np.zeros_like(kp_dev)
    for b, kv_len in enumerate(kv_lens):
        pos = np.arange(kv_len)
        blocks = table[b, pos // bs]
        ok = blocks >= 0
        kp_dev[cu_k[b] + pos[ok]] = kc[blocks[ok], pos[ok] % bs]
        vp_dev[cu_k[b] + pos[ok]] = vc[blocks[ok], pos[ok] % bs]
        if case.W > 0:  # keys before every row's window must never be read: poison them
            unseen = max(0, kv_len - lens[b][0] - case.W + 1)
            kp_dev[cu_k[b]:cu_k[b] + unseen] = NAN_BITS[case.dtype]
            vp_dev[cu_k[b]:cu_k[b] + unseen] = NAN_BITS[case.dtype]

    cu_q = np.concatenate([[0], np.cumsum([q for q, _ in lens])]).astype(np.int32)
    problem = dataclasses.replace(
        make_problem(T=T, B=B, N=N, Nkv=Nkv, H=H, bs=bs, max_blocks=max_blocks,
                     dtype=case.dtype, scale=case.scale, softcap=case.softcap, window=case.W),
        num_blocks=num_blocks)
    return Inputs(problem, lens, table, q32, kc32, vc32, q_dev, kp_dev, vp_dev, cu_q, cu_k)


def reference(inp):
    """paged_attention_reference on float32 copies. Its new tokens carry exactly the K/V already
    in their cache slots, so its cache write changes nothing."""
    p, table = inp.problem, inp.table
    cum = inp.cu_q
    past = np.array([pst for _, pst in inp.lens], dtype=np.int32)
    key = np.zeros((p.num_tokens, p.kv_num_heads, p.head_size), np.float32)
    value = np.zeros_like(key)
    t = 0
    for b, (q_len, pst) in enumerate(inp.lens):
        for j in range(q_len):
            blk = table[b, (pst + j) // p.block_size]
            if blk >= 0:
                key[t] = inp.kc32[blk, (pst + j) % p.block_size]
                value[t] = inp.vc32[blk, (pst + j) % p.block_size]
            t += 1
    kc, vc = inp.kc32.copy(), inp.vc32.copy()
    out = paged_attention_reference(
        inp.q32.reshape(p.num_tokens, -1), key.reshape(p.num_tokens, -1),
        value.reshape(p.num_tokens, -1), kc, vc, cum, past, table,
        num_heads=p.num_heads, kv_num_heads=p.kv_num_heads, scale=p.scale, softcap=p.softcap,
        local_window_size=p.window)
    assert np.array_equal(kc, inp.kc32) and np.array_equal(vc, inp.vc32), "test bug"
    return out


def rows_without_keys(inp):
    p, rows, t = inp.problem, [], 0
    for b, (q_len, pst) in enumerate(inp.lens):
        for j in range(q_len):
            pos = pst + j
            lo = max(0, pos - p.window + 1) if p.window > 0 else 0
            if not (inp.table[b, np.arange(lo, pos + 1) // p.block_size] >= 0).any():
                rows.append(t)
            t += 1
    return rows


def run_kernel(inp, tag):
    import cupy

    p = inp.problem
    nan = NAN_BITS[p.dtype]
    out = cupy.full((p.num_tokens, p.num_heads * p.head_size), nan, dtype=nan.dtype)
    need = mk.workspace_elements(p)
    accum = cupy.full(need, np.nan, dtype=cupy.float32) if need else None
    d = {k: cupy.asarray(getattr(inp, k)) for k in ("q_dev", "kp_dev", "vp_dev", "cu_q", "cu_k")}
    table = cupy.asarray(inp.table)
    mk.launch_fmha(p, d["q_dev"], inp.q_dev.shape[1], d["kp_dev"], d["vp_dev"], out, accum,
                   d["cu_q"], d["cu_k"], table, max(q for q, _ in inp.lens), tag)
    return from_device_bits(cupy.asnumpy(out), p.dtype)


@pytest.fixture(scope="module")
def gpu_cache(tmp_path_factory):
    """Builds every variant this GPU can run, in parallel, into a private cache."""
    import cupy

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUPY_PAGED_CACHE_DIR", str(tmp_path_factory.mktemp("mea_cache")))
        sm = int(cupy.cuda.Device().compute_capability)
        names = [n for n in mk.all_variant_names()
                 if int(n.split("_sm")[1].split("_")[0]) <= sm]
        results = compile_many([(n, f"sm_{sm}") for n in names], jobs=os.cpu_count())
        for r in results:
            print(f"\n{r.name} for {r.arch}: {r.seconds:.1f} s", end="")
        yield sm


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_mea_matches_reference(case, gpu_cache):
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    inp = make_inputs(case, rng)
    got = run_kernel(inp, case.tag)
    want = reference(inp)
    assert np.isfinite(got).all(), f"{case.id}: NaN/inf left in the output"
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    print(f"\n{case.id}: rel err {err:.2e} (tol {TOL[case.dtype]:.1e})", end="")
    assert err <= TOL[case.dtype], f"{case.id}: relative error {err:.3e}"
    empty = rows_without_keys(inp)
    assert empty, "test bug: every case has a sequence whose table row is all -1"
    assert np.all(got[empty] == 0), f"{case.id}: rows that see no key are not exactly 0"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tag", RUNS)
def test_mea_window_one_probe(dtype, tag, gpu_cache):
    """W = 1, block_size 1, every third position unmapped: row j's output is exactly V at its
    own position (softmax over one key is 1), or exactly 0 where that position is unmapped."""
    case = MeaCase(dtype, tag, 64, 4, 2, 1, 1, 0.0, 0.0, "mixed", False)
    inp = make_inputs(case, np.random.default_rng(7))
    for b, (q_len, pst) in enumerate(inp.lens[:-1]):
        inp.table[b, 2:q_len + pst:3] = -1
    kv_lens = np.diff(inp.cu_k)
    for b in range(len(inp.lens)):  # rebuild packed K/V after the edit: zeros where unmapped
        pos = np.arange(kv_lens[b])
        inp.kp_dev[inp.cu_k[b] + pos[inp.table[b, pos] < 0]] = 0
        inp.vp_dev[inp.cu_k[b] + pos[inp.table[b, pos] < 0]] = 0
    got = run_kernel(inp, tag).reshape(-1, 4, 64)
    t = 0
    for b, (q_len, pst) in enumerate(inp.lens):
        for j in range(q_len):
            blk = inp.table[b, pst + j]
            want = inp.vc32[blk, 0] if blk >= 0 else np.zeros((2, 64), np.float32)
            np.testing.assert_array_equal(got[t], np.repeat(want, 2, axis=0), f"row {t}")
            t += 1


@pytest.mark.gpu
def test_mea_launch_info(gpu_cache):
    import cupy

    limit = cupy.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]
    for name in mk.all_variant_names():
        tag = int(name.split("_sm")[1].split("_")[0])
        if tag > gpu_cache:
            continue
        q, k = (int(name.split(f"_{c}")[1].split("_")[0]) for c in ("q", "k"))
        _, smem, threads = mk._kernel(cupy.cuda.Device().id, name)
        print(f"\n{name}: {smem} B smem, {threads} threads", end="")
        assert threads == q * k // 32 and 0 < smem <= limit


@pytest.mark.gpu
def test_mea_no_queries_launches_nothing(gpu_cache):
    import cupy

    p = make_problem(T=0, B=3)
    out = cupy.zeros((0, p.num_heads * p.head_size), cupy.float16)
    z = cupy.zeros((0, p.kv_num_heads, p.head_size), cupy.float16)
    cu = cupy.zeros(4, cupy.int32)
    mk.launch_fmha(p, out, 256, z, z, out, None, cu, cu, cupy.full((3, 8), -1, cupy.int32), 0,
                   gpu_cache)
    cupy.cuda.Device().synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["prefill", "decode"])
def test_mea_throughput(shape, gpu_cache):
    """Informational: causal fp16 prefill B=8 x 2048, 32 heads of 128 (TFLOP/s; upstream fMHA
    64x64 gave 111 here, 64x128 161), and decode B=64 x 4096 keys, 32/8 heads (K+V TB/s)."""
    import cupy

    prefill = shape == "prefill"
    B, L, N, Nkv, H, bs = (8, 2048, 32, 32, 128, 256) if prefill else (64, 4096, 32, 8, 128, 256)
    q_len = L if prefill else 1
    rand = cupy.random.default_rng(0)
    q = rand.standard_normal((B * q_len, N * H), dtype=cupy.float32).astype(cupy.float16)
    kp = rand.standard_normal((B * L, Nkv, H), dtype=cupy.float32).astype(cupy.float16)
    vp = rand.standard_normal((B * L, Nkv, H), dtype=cupy.float32).astype(cupy.float16)
    table = cupy.arange(B * (L // bs), dtype=cupy.int32).reshape(B, L // bs)
    cu_q = cupy.arange(B + 1, dtype=cupy.int32) * q_len
    cu_k = cupy.arange(B + 1, dtype=cupy.int32) * L
    p = make_problem(T=B * q_len, B=B, N=N, Nkv=Nkv, H=H, bs=bs, max_blocks=L // bs)
    out = cupy.empty((B * q_len, N * H), cupy.float16)
    args = (p, q, N * H, kp, vp, out, None, cu_q, cu_k, table, q_len, gpu_cache)
    mk.launch_fmha(*args)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    reps = 10
    start.record()
    for _ in range(reps):
        mk.launch_fmha(*args)
    stop.record()
    stop.synchronize()
    seconds = cupy.cuda.get_elapsed_time(start, stop) / 1e3 / reps
    if prefill:
        rate = 4 * B * N * H * (L * (L + 1) / 2) / seconds / 1e12
        print(f"\n{shape}: {seconds * 1e3:.2f} ms, {rate:.0f} TFLOP/s (causal)", end="")
    else:
        rate = 2 * kp.nbytes / seconds / 1e12
        print(f"\n{shape}: {seconds * 1e6:.0f} us, {rate:.2f} TB/s of K+V", end="")
    assert bool(cupy.isfinite(out).all())
