"""The "mea" backend's kernels: tile policy, one KernelSpec per instantiation, and the launcher.

The kernel (cuda_src/mea/fmha_paged.cuh) runs CUTLASS's memory-efficient attention GEMMs over a
packed copy of each sequence's keys/values, with GQA, bottom-right causal, sliding-window,
unmapped-block masks and softcap. Instantiations are named
``mea_fwd_{f16|bf16}_sm{tag}_q{queries}_k{keys}_h{max_k}``; that name is the extern "C" symbol,
the cache file and the test id. CuPy is imported only when launching.
"""
from __future__ import annotations

import functools

import numpy

from cupy_paged.jit import KernelSpec, register

from ._launch import DTYPES, DirectLaunch
from ._params import entry_point, params_struct

ARCH_TAGS = (50, 70, 75, 80)          # CUTLASS arch tags with an fMHA configuration
ANY_HEAD = 1 << 16                    # kMaxK of the tile that streams the output via gmem
_SOURCE = "mea/fmha_entry.cu"
FMHA_PARAMS = params_struct("mea/params.cuh", "cupy_paged::mea::FmhaParams")


def arch_tag(sm) -> int:
    """The CUTLASS arch tag a device of compute capability ``sm`` runs: 80 for sm_80 and newer
    (sm_86/89/90 build the Sm80 kernels for their own arch), 75, 70, else 50."""
    sm = int(sm)
    for tag in reversed(ARCH_TAGS):
        if sm >= tag:
            return tag
    raise ValueError(f"sm: the mea kernels need sm_50 or newer, got sm_{sm}")


def tiles(tag: int) -> tuple:
    """(queries, keys, max_k) per block, in xformers'/PyTorch's forward dispatch order.

    Their generator instantiates, per arch, 64x64 (H <= 64), a 128-key single-value-iteration
    tile (H <= 128; 64 query rows on Sm80, 32 below: "better perf with 64x128 on A100", and
    on the H100 too: benchmarks/NOTES.md) and 32x128 with unbounded H, whose partial
    output goes through a float32 workspace; the dispatcher takes the first with max_k >= H.
    """
    return ((64, 64, 64), (64 if tag >= 80 else 32, 128, 128), (32, 128, ANY_HEAD))


def choose_tile(sm, head_size: int) -> tuple:
    """(queries, keys, max_k) for ``head_size`` on a device of compute capability ``sm``."""
    for tile in tiles(arch_tag(sm)):
        if head_size <= tile[2]:
            return tile
    raise ValueError(f"head_size: at most {ANY_HEAD}, got {head_size}")


def variant_name(dtype, sm, head_size: int) -> str:
    """The instantiation that runs ``dtype`` ("float16"/"bfloat16") and ``head_size`` with arch
    tag ``arch_tag(sm)``; registers its KernelSpec. Raises ValueError for bf16 below Sm80."""
    tag = arch_tag(sm)
    return _register(_dtype_name(dtype), tag, *choose_tile(tag, head_size))


def all_variant_names() -> list:
    """Every instantiation (f16 on each arch tag, bf16 on Sm80), registered; for precompiles."""
    return [_register(dtype, tag, *tile) for dtype in DTYPES for tag in ARCH_TAGS
            if dtype == "float16" or tag >= 80 for tile in tiles(tag)]


def workspace_elements(problem) -> int:
    """float32 elements of ``out_accum`` the launch needs: T*N*H when H > 128, else 0.

    Only the unbounded-H tile accumulates its output outside registers; its H threshold (128)
    is the same on every arch tag, so this needs no SM.
    """
    if choose_tile(80, problem.head_size)[2] <= 128:
        return 0
    return problem.num_tokens * problem.num_heads * problem.head_size


def launch_fmha(problem, q, q_row_stride, k_packed, v_packed, out, out_accum, cu_q, cu_k,
                block_table, max_seqlen_q, sm, fault=None):
    """Launch the paged fMHA on the current CuPy stream (asynchronous; no host sync).

    q: (T, N, H) rows with row stride ``q_row_stride`` elements (e.g. a packed QKV buffer).
    k_packed, v_packed: (rows, Nkv, H) contiguous; row cu_k[b] + pos is key pos of sequence b
    (any values at unmapped positions: they are masked). out: (T, N*H). out_accum: float32 of
    ``workspace_elements(problem)`` elements, or None when that is 0. cu_q, cu_k: int32 (B+1,);
    block_table: int32 (B, max_blocks). max_seqlen_q: host-known bound on every q_len.
    ``sm`` picks the arch tag (pass a lower one to force e.g. the Sm75 kernel); the cubin is
    built for the current device. fault: the metadata guard's int32 (B+1,) verdict, or None:
    blocks of a faulted sequence (all when fault[B] != 0) return at once and write nothing.
    Whatever cu_q / cu_k hold, a block runs only if its query rows lie within q's and out's
    rows and its key rows within k_packed's and v_packed's (and the table's capacity). 16-bit arrays may be float16, bfloat16 or their uint16 bits.
    The first launch per (device, variant) compiles or loads the cubin and reads its launch
    info back (one small device-to-host copy): do it before capturing a CUDA graph.
    """
    import cupy

    need = workspace_elements(problem)
    _check_launch(problem, q, q_row_stride, (q, k_packed, v_packed, out), out_accum, need)
    for arg, a in (("cu_q", cu_q), ("cu_k", cu_k), ("block_table", block_table)):
        if a.dtype != numpy.int32:
            raise TypeError(f"{arg}: must be int32 (got {a.dtype}): pass {arg}.astype(cupy.int32)")
    if problem.batch == 0 or max_seqlen_q <= 0:
        return
    launch = fmha_launch(problem, cupy.cuda.Device().id, sm, q_row_stride, max_seqlen_q,
                         min(q.shape[0], out.shape[0]), min(k_packed.shape[0], v_packed.shape[0]))
    launch(q.data.ptr, k_packed.data.ptr, v_packed.data.ptr, out.data.ptr,
           out_accum.data.ptr if need else 0, cu_q.data.ptr, cu_k.data.ptr,
           block_table.data.ptr, 0 if fault is None else fault.data.ptr)


def fmha_launch(problem, device, sm, q_row_stride, max_seqlen_q, num_tokens, kv_rows):
    """The fMHA's DirectLaunch for ``problem`` on ``device`` with arch tag ``arch_tag(sm)``:
    grid (ceil(max_seqlen_q / tile rows), N, B); q rows of ``q_row_stride`` elements; q and
    out of ``num_tokens`` rows, the packed K/V of ``kv_rows``."""
    if problem.batch > 65535:
        raise ValueError(f"batch: the mea kernel's grid holds at most 65535 sequences, got "
                         f"{problem.batch}; split the batch")
    name = variant_name(problem.dtype, sm, problem.head_size)
    tile_q = choose_tile(sm, problem.head_size)[0]
    kernel, smem, threads = _kernel(device, name)
    grid = ((int(max_seqlen_q) + tile_q - 1) // tile_q, problem.num_heads, problem.batch)
    packed = FMHA_PARAMS.pack(
        q_row_stride=q_row_stride, max_blocks=problem.max_blocks,
        block_size=problem.block_size, num_heads=problem.num_heads,
        kv_num_heads=problem.kv_num_heads, head_size=problem.head_size, scale=problem.scale,
        softcap=problem.softcap, window=problem.window, num_tokens=num_tokens,
        kv_rows=kv_rows)
    return DirectLaunch(kernel, FMHA_PARAMS, packed, grid, (32, threads // 32, 1), smem)


# ---------------------------------------------------------------- helpers


def _dtype_name(dtype) -> str:
    name = getattr(dtype, "name", None) or str(dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype: the mea kernels run float16 or bfloat16, got {name}")
    return name


@functools.cache
def _register(dtype: str, tag: int, queries: int, keys: int, max_k: int) -> str:
    short, ctype = DTYPES[dtype].short, DTYPES[dtype].cutlass
    if short == "bf16" and tag < 80:
        raise ValueError(f"dtype: bfloat16 needs the Sm80 kernels (sm_80 or newer), got Sm{tag}")
    name = f"mea_fwd_{short}_sm{tag}_q{queries}_k{keys}_h{max_k}"
    fmha = f"{name}_fmha"
    entry = (f"using {fmha} = cupy_paged::mea::PagedFmha<AttentionKernel<{ctype}, "
             f"cutlass::arch::Sm{tag}, true, {queries}, {keys}, {max_k}, false, false>>;\n"
             f'extern "C" __device__ int {name}_launch_info[2] = {{{fmha}::kSmemBytes, '
             f"{fmha}::kThreads}};\n"
             + entry_point(name, FMHA_PARAMS, f"cupy_paged::mea::paged_fmha<{fmha}>(p);",
                           f"{fmha}::kThreads", f"{fmha}::kMinBlocksPerSm"))
    # -default-device: CUTLASS leaves constexpr helpers unannotated (see jit/registry.py)
    register(KernelSpec(name, _SOURCE, entry, options=("-default-device",),
                        min_arch=tag, cutlass=True))
    return name


@functools.cache
def _kernel(device_id: int, name: str):
    """(RawKernel, dynamic smem bytes, threads per block) of ``name`` on ``device_id``.

    Loaded through ``jit.get_module``; the launch facts come from the module's
    ``<name>_launch_info`` global.
    """
    import cupy

    from cupy_paged.jit import get_module

    device = cupy.cuda.Device(device_id)
    module = get_module(name, device_id)
    with device:
        kernel = module.get_function(name)
        info = module.get_global(f"{name}_launch_info")
        smem, threads = (int(v) for v in cupy.ndarray((2,), cupy.int32, info).get())
        limit = device.attributes["MaxSharedMemoryPerBlockOptin"]
        if smem > limit:
            raise ValueError(f"{name} needs {smem} bytes of shared memory per block; this "
                             f"GPU allows {limit}: pass a lower sm or another backend")
        kernel.max_dynamic_shared_size_bytes = smem
    return kernel, smem, threads


def _check_launch(problem, q, q_row_stride, arrays, out_accum, need):
    """Host-side facts the kernel relies on (no device reads)."""
    for a in arrays:
        if a.dtype.itemsize != 2:
            raise TypeError(f"the mea kernel reads 16-bit elements, got {a.dtype}")
        if a.data.ptr % 16:
            raise ValueError("the mea kernel needs 16-byte aligned q/k/v/out base pointers")
    if q_row_stride % 8 or problem.head_size % 8:
        raise ValueError(f"q_row_stride ({q_row_stride}) and head_size ({problem.head_size}) "
                         "must be multiples of 8 (16-byte rows)")
    if need and (out_accum is None or out_accum.dtype != numpy.float32 or out_accum.size < need):
        raise ValueError(f"out_accum: head_size {problem.head_size} needs a float32 workspace "
                         f"of {need} elements (workspace_elements(problem))")
