"""Flash backend kernels: variant naming and registration, and their launches (``ForwardStep``,
the forward kernel and the split-KV combine of one plan; ``launch_flash``, the same outside a
plan). The tiles: ``_flash_tiles``; tile, split and launch-mode policy: ``_flash_policy``.

Mechanism lives in ``cuda_src/flash/`` (a FlashAttention-2 style forward kernel that reads K/V
straight from the paged cache, and the split-KV combine). Imports with NumPy alone; CuPy loads
at the first launch. Nothing here reads device memory: every launch is CUDA-graph capturable.
"""
from __future__ import annotations

import functools
import math

from ..jit import KernelSpec, get_function, register
from . import _flash90
from ._flash_policy import choose, problem_tile, workspace_shape
from ._flash_tiles import SMEM_LIMIT, all_tiles
from ._launch import DTYPES, DirectLaunch, pointer, sm_count
from ._params import entry_point, params_struct
from .plan import Launch

_LOG2E = math.log2(math.e)
_COMBINE_THREADS = 256
FWD_PARAMS = params_struct("flash/params.cuh", "cupy_paged::flash::FwdParams")
COMBINE_PARAMS = params_struct("flash/params.cuh", "cupy_paged::flash::CombineParams")


# ---------------------------------------------------------------- names and registration


def fwd_name(dtype, tile):
    """e.g. flash_fwd_f16_h128_m64_n64_w4_s2_sm80: extern "C" symbol, cache file, test id
    (an sm90a tile's: ``_flash90.fwd_name``)."""
    if isinstance(tile, _flash90.Tile90):
        return _flash90.fwd_name(dtype, tile)
    short = DTYPES[dtype].short
    keys = f"_k{tile.key_warps}" if tile.key_warps > 1 else ""
    swz = "_swz" if tile.swizzle else ""
    return (f"flash_fwd_{short}_h{tile.head}_m{tile.bm}_n{tile.bn}_w{tile.warps}{keys}"
            f"_s{tile.stages}{swz}_{tile.arch}")


def combine_name(dtype):
    return f"flash_combine_{DTYPES[dtype].short}"


@functools.cache
def _register_fwd(dtype, tile):
    if isinstance(tile, _flash90.Tile90):
        return _flash90.register_fwd(dtype, tile, FWD_PARAMS)
    name = fwd_name(dtype, tile)
    if tile.smem_bytes > SMEM_LIMIT[tile.arch]:
        raise ValueError(f"{name}: {tile.smem_bytes} bytes of shared memory > the "
                         f"{tile.arch} class's {SMEM_LIMIT[tile.arch]}")
    ctype = DTYPES[dtype].ctype
    limit = "kSmemSm80" if tile.arch == "sm80" else "kSmemSm86"
    traits = (f"cupy_paged::flash::Traits<{ctype}, {tile.head}, {tile.bm}, {tile.bn}, "
              f"{tile.warps}, {tile.stages}, cupy_paged::flash::{limit}, "
              f"{tile.key_warps}, {'true' if tile.swizzle else 'false'}>")
    entry = entry_point(name, FWD_PARAMS, f"cupy_paged::flash::fwd<{traits}>(p);",
                        tile.threads)
    register(KernelSpec(name, "flash/flash.cu", entry, min_arch=80))
    return name


@functools.cache
def _register_combine(dtype):
    name, ctype = combine_name(dtype), DTYPES[dtype].ctype
    entry = entry_point(name, COMBINE_PARAMS, f"cupy_paged::flash::combine<{ctype}>(p);",
                        _COMBINE_THREADS)
    register(KernelSpec(name, "flash/flash.cu", entry, min_arch=80))
    return name


def _check_dtype(dtype):
    if dtype not in DTYPES:
        raise ValueError(f"the flash kernel runs float16 and bfloat16, got {dtype}")


def variant_name(problem, sm, tile=None, sm90=None):
    """Registers and returns the forward instantiation ``problem`` runs on compute capability
    ``sm`` (an int such as 80 or 90): ``tile``'s, or the heuristic's (``problem_tile``; sm90
    False: the sm80 kernel's even on 9.0, as when the call splits its keys)."""
    _check_dtype(problem.dtype)
    if tile is None:
        tile = problem_tile(problem, sm, sm90)
    return _register_fwd(problem.dtype, tile)


def all_variant_names(arch="sm80"):
    """Every forward instantiation of tile class ``arch`` ("sm80", "sm86", or "sm90a": the
    sm90a kernel's) and the combine kernels, registered."""
    tiles = _flash90.all_tiles() if arch == "sm90a" else all_tiles(arch)
    names = [_register_fwd(d, t) for d in DTYPES for t in tiles]
    return names + [_register_combine(d) for d in DTYPES]


def block_divisor(block_size):
    """(block_size, shift, magic, magic_shift) of cuda_src/common/paged_kv.cuh's BlockDiv:
    shift = log2 for powers of two, else q = umulhi(n, magic) >> magic_shift for n < 2^31."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if block_size & (block_size - 1) == 0:
        return block_size, block_size.bit_length() - 1, 0, 0
    p = 31 + (block_size - 1).bit_length()
    return block_size, -1, -(-(1 << p) // block_size), p - 32


# ---------------------------------------------------------------- launches


def forward_params(problem, num_splits, num_work):
    """The packed FwdParams scalars of ``problem`` with ``num_splits`` key splits over
    ``num_work`` work units (query tiles x kv heads)."""
    bs, shift, magic, magic_shift = block_divisor(problem.block_size)
    cap = problem.softcap if problem.softcap > 0 else 0.0
    return FWD_PARAMS.pack(
        num_tokens=problem.num_tokens, batch=problem.batch, num_heads=problem.num_heads,
        kv_heads=problem.kv_num_heads, head_size=problem.head_size, group=problem.group,
        block_size=bs, block_shift=shift, block_magic=magic, block_magic_shift=magic_shift,
        num_blocks=problem.num_blocks, max_blocks=problem.max_blocks,
        scale_log2=problem.scale * _LOG2E, cap_in=problem.scale / cap if cap else 0.0,
        cap_out=cap * _LOG2E, window=max(0, problem.window),
        num_splits=num_splits, num_work=num_work)


class ForwardStep:
    """The flash attention launches of one plan: the forward kernel over the paged cache and,
    with split-KV, the combine (its workspace: ``stream_workspace``).

    problem: the call's Problem; device: GPU id; sm: its compute capability; tile: the tile
    to run (None: ``problem_tile``); num_splits: None = ``plan_splits``, 1 = no split-KV, S =
    force S; programmatic: the forward kernel starts behind the kernel launched just before
    it (the prologue) and the combine behind the forward kernel (sm90+, common/pdl.cuh);
    kernel: None, "sm80" or "sm90a" (``_flash_policy.choose``).
    """

    def __init__(self, problem, device, sm, tile=None, num_splits=None, programmatic=False,
                 kernel=None):
        _check_dtype(problem.dtype)
        tile, splits = choose(problem, sm, sm_count(device), tile, num_splits, kernel)
        if not 1 <= splits <= 65535:
            raise ValueError(f"num_splits must be in [1, 65535], got {num_splits}")
        T, B, N, H, G = (problem.num_tokens, problem.batch, problem.num_heads,
                         problem.head_size, problem.group)
        grid_x = (-(-T * G // tile.bm) + B) * problem.kv_num_heads  # kv head fastest
        if grid_x >= 2 ** 31:
            raise ValueError(f"grid ({grid_x}, 1, {splits}) exceeds CUDA's limits")
        self.problem, self.tile, self.splits, self.device = problem, tile, splits, device
        name, grid = _register_fwd(problem.dtype, tile), (grid_x, 1, splits)
        self.persistent = getattr(tile, "persistent", False)
        if self.persistent:  # one CTA per SM walks the work units
            grid = (min(grid_x, sm_count(device)), 1, 1)
        kernel = get_function(name, device=device)
        if tile.smem_bytes > 48 * 1024:
            kernel.max_dynamic_shared_size_bytes = tile.smem_bytes
        self.forward = DirectLaunch(kernel, FWD_PARAMS, forward_params(problem, splits, grid_x),
                                    grid, (tile.threads,), tile.smem_bytes,
                                    programmatic=programmatic)
        facts = [Launch(name, grid, (tile.threads, 1, 1), tile.smem_bytes, programmatic)]
        self.combine = None
        if splits > 1:
            combine = _register_combine(problem.dtype)
            rows = T * N
            combine_grid = (max(1, min(-(-rows * H // 4 // _COMBINE_THREADS),
                                       16 * sm_count(device))), 1, 1)
            packed = COMBINE_PARAMS.pack(rows=rows, head_size=H, num_splits=splits, batch=B,
                                         num_heads=N)
            self.combine = DirectLaunch(get_function(combine, device=device), COMBINE_PARAMS,
                                        packed, combine_grid, (_COMBINE_THREADS,),
                                        programmatic=programmatic)
            facts.append(Launch(combine, combine_grid, (_COMBINE_THREADS, 1, 1), 0,
                                programmatic))
        self.facts = tuple(facts)
        self._held = None  # (stream, workspace) of the last split-KV call
        self._held_counter = None  # (stream, counter) of the last persistent call

    def __call__(self, call):
        if self.problem.num_tokens == 0 or self.problem.batch == 0:
            return
        p = call.ptr
        self._launch(call.q_ptr, p["key_cache"], p["value_cache"],
                     p["cumulative_sequence_length"], p["past_seqlens"], p["block_table"],
                     p["out"], pointer(call.fault), p.get("head_sink", 0), None, call.stream)

    def run(self, q, key_cache, value_cache, cum, past, block_table, out, fault=None,
            workspace=None, stream=None, head_sink=None):
        """Attention of the (already rotated) q over the paged caches into out (see
        ``launch_flash``) on ``stream`` (a handle; None: the current CuPy stream); workspace
        None: the stream's own (``stream_workspace``); head_sink: None, or (N,) in q's dtype
        (the Problem must say ``head_sink``)."""
        if self.problem.num_tokens == 0 or self.problem.batch == 0:
            return out
        q_p, kc_p, vc_p, o_p = (q.data.ptr, key_cache.data.ptr, value_cache.data.ptr,
                                out.data.ptr)
        if (q_p | kc_p | vc_p | o_p) & 15:
            _check_arrays(q, key_cache, value_cache, out)
        if workspace is not None:
            workspace = self._check_workspace(workspace)
        self._launch(q_p, kc_p, vc_p, cum.data.ptr, past.data.ptr, block_table.data.ptr, o_p,
                     pointer(fault), pointer(head_sink), workspace, stream)
        return out

    def _launch(self, q, key_cache, value_cache, cum, past, block_table, out, fault, sink,
                workspace, stream):
        """The launches on ``stream`` (a handle; None: the current CuPy stream) from the
        arguments' device addresses; workspace None: the stream's own."""
        if self.splits > 1:
            partial_o, partial_lse = (self._workspace(stream) if workspace is None
                                      else workspace)
            po_p, pl_p = partial_o.data.ptr, partial_lse.data.ptr
        else:
            po_p = pl_p = out  # never dereferenced with num_splits == 1
        counter = self._counter(stream) if self.persistent else 0
        self.forward(q, key_cache, value_cache, cum, past, block_table, out, po_p, pl_p, fault,
                     sink, counter, stream=stream)
        if self.combine is not None:
            self.combine(po_p, pl_p, out, fault, sink, stream=stream)

    def _counter(self, stream):
        """The address of the stream's persistent-grid unit counter (``stream_counter``)."""
        return self._per_stream("_held_counter", stream, lambda cupy, s: stream_counter(
            cupy, self.device, s)).data.ptr

    def _workspace(self, stream):
        """The stream's workspace (a workspace is never freed, so one the stream has outgrown
        since stays valid)."""
        return self._per_stream("_held", stream, lambda cupy, s: stream_workspace(
            cupy, self.device, s, *workspace_shape(self.problem, self.splits)))

    def _per_stream(self, attr, stream, make):
        """make(cupy, stream)'s buffer for ``stream`` (a handle; None: the current CuPy stream),
        remembered in ``attr`` as (stream, buffer) for the last stream this step ran on."""
        import cupy

        if stream is None:
            stream = cupy.cuda.get_current_stream().ptr
        held = getattr(self, attr)
        if held is None or held[0] != stream:
            held = (stream, make(cupy, stream))
            setattr(self, attr, held)
        return held[1]

    def _check_workspace(self, workspace):
        o_shape, lse_shape = workspace_shape(self.problem, self.splits)
        partial_o, partial_lse = workspace
        if (partial_o.dtype.itemsize != 4 or partial_o.size < math.prod(o_shape)
                or partial_lse.size < math.prod(lse_shape)):
            raise ValueError(f"flash: workspace must be float32 of shapes {o_shape} and "
                             f"{lse_shape} (see workspace_shape)")
        return workspace


def _check_arrays(*arrays):
    """ValueError unless every array is 16-bit on a 16-byte aligned address (plan calls get
    dtypes validated; their addresses are checked per call)."""
    for arr in arrays:
        if arr.dtype.itemsize != 2 or arr.data.ptr % 16:
            raise ValueError("flash: q, caches and out must be 16-bit arrays on 16-byte "
                             f"aligned addresses (got {arr.dtype} at {arr.data.ptr:#x})")


_workspaces: dict = {}  # (device id, stream ptr) -> (partial_o, partial_lse), grow-only
_retired: list = []     # outgrown workspaces, kept alive for graphs captured before the growth


def stream_workspace(xp, device, stream, o_shape, lse_shape):
    """Float32 (partial_o, partial_lse) views of at least these shapes' elements, kept per
    (device, stream handle): they only grow and are never freed, so a captured CUDA graph's
    workspace stays valid and calls on different streams never share one."""
    key = (device, stream)
    held = _workspaces.get(key)
    n_o, n_lse = math.prod(o_shape), math.prod(lse_shape)
    if held is None or held[0].size < n_o or held[1].size < n_lse:
        if held is not None:
            _retired.append(held)  # a graph captured earlier may still point into it
            n_o, n_lse = max(n_o, held[0].size), max(n_lse, held[1].size)
        held = (xp.empty(n_o, dtype=xp.float32), xp.empty(n_lse, dtype=xp.float32))
        _workspaces[key] = held
    return held


_counters: dict = {}  # (device id, stream ptr) -> int32 (2,) zeros


def stream_counter(xp, device, stream):
    """The int32 (2,) unit counter of persistent sm90a launches on (device, stream handle):
    zero between launches (the last CTA of a launch resets it), never freed (a captured CUDA
    graph keeps pointing at it), one per stream so launches on different streams never share
    one."""
    key = (device, stream)
    held = _counters.get(key)
    if held is None:
        held = _counters[key] = xp.zeros(2, dtype=xp.int32)
    return held


@functools.lru_cache(maxsize=16)
def _standalone_step(problem, device, sm, tile, num_splits):
    """The ForwardStep ``launch_flash`` runs, kept for calls that repeat (tests, timing)."""
    return ForwardStep(problem, device, sm, tile, num_splits)


def launch_flash(problem, q, key_cache, value_cache, cum, past, block_table, out, sm,
                 num_splits=None, workspace=None, fault=None, tile=None, head_sink=None):
    """The forward kernel (and combine) alone, outside a plan, on the current CuPy stream; no
    device->host synchronisation. Returns out.

    q, out: (T, N*H); key_cache, value_cache: (num_blocks, block_size, Nkv, H), already holding
    the new keys; cum (B+1,), past (B,), block_table (B, max_blocks): int32. All C-contiguous,
    16-bit (float16 / bfloat16, or their bits as uint16), 16-byte aligned. sm: compute
    capability (e.g. 90). num_splits: None = plan_splits, 1 = no split-KV, S = force S.
    tile: a ``Tile`` to run instead of the heuristic's. workspace: None (a fresh one per
    call), or float32 (partial_o, partial_lse) of ``workspace_shape(problem, S)`` or larger,
    which a CUDA graph capture must keep alive. fault: None, or the metadata guard's int32
    (B+1,) flags: CTAs of a faulted sequence (all, when fault[B] != 0) write nothing to out,
    and with split-KV poison their partial sums so the combine writes NaN rows. head_sink:
    None, or (N,) in q's dtype: each query head's sink logit in the softmax denominator.
    """
    _check_arrays(q, key_cache, value_cache, out)
    step = _standalone_step(problem, q.data.device_id, int(sm), tile, num_splits)
    return step.run(q, key_cache, value_cache, cum, past, block_table, out, fault, workspace,
                    head_sink=head_sink)
