"""Which kernels a model needs: the policy half of ``precompile`` (no CuPy, no GPU).

``needed_variants`` turns a model's dtypes, head sizes, head counts and block sizes into the
variant names each GPU backend can launch on each arch (``backend_variants``, probing every
q_len the flash planner can tile for), with a ``Skipped`` sentence for each backend that cannot
run there; ``check_config`` / ``check_arch`` normalise the arguments (ValueError saying what to
fix) and ``gpu_archs`` names the visible GPUs' archs. Split from _precompile.py, which builds
these variants and re-exports every name here.
"""
from __future__ import annotations

import dataclasses
import numbers
import re
from dataclasses import dataclass

from . import backends
from ._validate import Problem
from .backends import _flash_kernels, _flash_tiles, _gather, _guard, _mea_kernels, _prologue
from .errors import ToolchainError
from .jit.registry import arch_number, get_spec

DTYPES = ("float16", "bfloat16")
_ALIASES = {"float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
            "bfloat16": "bfloat16", "bf16": "bfloat16"}
GPU_BACKENDS = ("flash", "mea")
# q_len probes from decode (1) to a 64K-token prefill chunk: the flash planner picks its tile
# from G * q_len, so these reach every tile it can pick for a head size (short and long rows).
_PROBE_Q_LENS = tuple(2 ** i for i in range(17))
_PLAIN_ARCH = re.compile(r"(?:sm_)?(\d+)")


@dataclass(frozen=True)
class Skipped:
    """Kernels that are not built, for which arch, and the sentence saying why."""

    what: str
    arch: str
    reason: str

    def __str__(self):
        return f"{self.what} for {self.arch}: {self.reason}"


# ---------------------------------------------------------------- which variants


def needed_variants(dtypes=None, head_sizes=None, num_heads=None, kv_num_heads=None,
                    block_sizes=None, all=False, archs=("sm_80",)):
    """([(variant name, arch), ...], [Skipped, ...]) for a model's configuration.

    Per (arch, dtype, head size): the prologue, then for each GPU backend whose capabilities
    accept the call on that SM, its kernels: mea's gather and fMHA variant; flash's forward
    variants for every tile its planner can pick (decode to long prefill) and its split-KV
    combine. ``all``: every head size the kernels are instantiated for (dtypes still apply).
    Pure policy: registers the variants, compiles nothing, needs neither CuPy nor a GPU.
    """
    dtypes, heads, n, nkv, blocks = check_config(dtypes, head_sizes, num_heads, kv_num_heads,
                                                 block_sizes, all)
    names, skipped = {}, {}
    for arch in archs:
        sm = arch_number(arch)
        for dtype in dtypes:
            for head in heads:
                for block in blocks:
                    problem = representative_problem(dtype, head, n, nkv, block)
                    for backend in GPU_BACKENDS:
                        why = _target_reasons(backend, problem, sm)
                        if why:
                            key = (backend, dtype, arch, "; ".join(why))
                            skipped.setdefault(key, {})[head] = None
                            continue
                        for name in backend_variants(backend, problem, sm):
                            # the arch-specific target of a variant that has one (sm_90a)
                            target = get_spec(name).target(sm) if get_spec(name).arch_features \
                                else arch
                            names.setdefault((name, target), None)
    out_skipped = []
    for (backend, dtype, arch, reason), skipped_heads in skipped.items():
        what = f"{backend} {dtype}"  # head sizes named only when the reason spares some
        if len(skipped_heads) < len(heads):
            what += f" head_size {', '.join(map(str, skipped_heads))}"
        out_skipped.append(Skipped(what, arch, reason))
    return list(names), out_skipped


def _target_reasons(backend, problem, sm):
    """Why ``backend`` cannot run ``problem`` on SM ``sm``, worded for a target arch (it need
    not be this machine's GPU)."""
    caps = backends.BACKENDS[backend].capabilities
    why = caps.reasons(problem, "cupy", None)  # the reasons that do not depend on the SM
    need = caps.dtype_min_sm.get(problem.dtype)
    if need is not None and sm < need:
        why.insert(0, f"{problem.dtype} needs sm_{need} or newer")
    return why


def backend_variants(backend, problem, sm):
    """Variant names ``backend`` ("flash" or "mea") launches for ``problem`` on SM ``sm``
    (the metadata guard and the prologue first), for every q_len from decode to a long prefill
    chunk. Registers them."""
    names = [_guard.NAME, _prologue.prologue_name(problem.dtype)]
    if backend == "mea":
        names += [_gather.gather_name(problem.dtype),
                  _mea_kernels.variant_name(problem.dtype, sm, problem.head_size)]
    elif backend == "flash":
        for q_len in _PROBE_Q_LENS:  # on 9.0 both kernels: sm80 runs the split-KV calls
            probe = with_q_len(problem, q_len)
            names.append(_flash_kernels.variant_name(probe, sm))
            names.append(_flash_kernels.variant_name(probe, sm, sm90=False))
        names.append(_flash_kernels._register_combine(problem.dtype))
    else:
        raise ValueError(f"backend: expected one of {', '.join(GPU_BACKENDS)}, got {backend!r}")
    return list(dict.fromkeys(names))


def representative_problem(dtype, head_size, num_heads=1, kv_num_heads=1, block_size=16):
    """A one-token (decode) ``Problem`` of this configuration, for capability checks and tiles."""
    return with_q_len(Problem(
        num_tokens=1, batch=1, num_heads=num_heads, kv_num_heads=kv_num_heads,
        head_size=head_size, block_size=block_size, num_blocks=1, max_blocks=1, packed=False,
        dtype=dtype, scale=head_size ** -0.5, softcap=0.0, window=-1, do_rotary=False,
        rotary_interleaved=False, rotary_dim=0, cos_rows=0), 1)


def with_q_len(problem, q_len):
    """``problem`` as one sequence of ``q_len`` new tokens (the flash tile depends on it)."""
    blocks = -(-q_len // problem.block_size)
    return dataclasses.replace(problem, num_tokens=q_len, num_blocks=blocks, max_blocks=blocks)


def check_config(dtypes, head_sizes, num_heads, kv_num_heads, block_sizes, all):
    """Normalised (dtypes, head sizes, N, Nkv, block sizes); ValueError saying what to fix."""
    dtypes = tuple(dict.fromkeys(_dtype(d) for d in (dtypes or DTYPES)))
    if all:
        if head_sizes:
            raise ValueError("head_sizes: all=True builds every head size; pass one or the other")
        head_sizes = _flash_tiles.HEAD_SIZES  # covers every mea tile too (<= 64, <= 128, more)
    elif not head_sizes:
        raise ValueError("head_sizes: pass the model's head size (e.g. head_sizes=[128], "
                         "--head-size 128), or all=True (--all) for every kernel")
    heads = tuple(dict.fromkeys(_positive("head_size", h) for h in head_sizes))
    bad = [h for h in heads if h % 8]
    if bad:
        raise ValueError(f"head_size: must be a multiple of 8 (the kernels move 16-byte rows), "
                         f"got {bad[0]}")
    if num_heads is None and kv_num_heads is not None:
        raise ValueError("num_heads: pass it with kv_num_heads (--num-heads with --kv-heads)")
    n = 1 if num_heads is None else _positive("num_heads", num_heads)
    nkv = n if kv_num_heads is None else _positive("kv_num_heads", kv_num_heads)
    if n % nkv:
        raise ValueError(f"num_heads: must be a multiple of kv_num_heads ({nkv}), got {n}")
    blocks = tuple(dict.fromkeys(_positive("block_size", b) for b in (block_sizes or (16,))))
    return dtypes, heads, n, nkv, blocks


def check_arch(arch):
    """"sm_80" / "80" / 80 -> "sm_80"; ValueError for anything else (suffixed archs such as
    sm_90a too: paged_attention loads the plain sm_XY cubin of the device)."""
    m = _PLAIN_ARCH.fullmatch(str(arch).strip().lower())
    if not m:
        raise ValueError(f"arch: expected an SM such as sm_80 or 80 (the plain arch "
                         f"paged_attention loads), got {arch!r}")
    return f"sm_{int(m.group(1))}"


def gpu_archs():
    """The distinct archs of the visible GPUs; ToolchainError saying to pass ``arch`` if none."""
    sms, error = [], None
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
        sms = [cupy.cuda.Device(i).compute_capability for i in range(count)]
    except Exception as exc:  # ImportError, or CUDARuntimeError without a driver or device
        error = exc
    if not sms:
        from .info import gpu_unavailable   # info imports _precompile, which imports this

        raise ToolchainError(f"nothing to build for here ({gpu_unavailable(error)}): pass "
                             "arch= (--arch sm_80 ...) to build for a GPU that is not here")
    return list(dict.fromkeys(f"sm_{sm}" for sm in sms))


def _dtype(name):
    key = getattr(name, "name", None) or str(name)
    if key.lower() not in _ALIASES:
        raise ValueError(f"dtype: the GPU kernels run float16 or bfloat16, got {key!r}")
    return _ALIASES[key.lower()]


def _positive(what, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what}: expected a positive integer, got {value!r}")
    return int(value)
