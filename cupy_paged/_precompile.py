"""Build the kernels a model needs before its first call: ``python -m cupy_paged precompile``.

``precompile(...)`` works out the variants ``paged_attention`` can pick for a model's dtypes and
head sizes on an arch (``needed_variants``), skips those no backend can run there (saying why),
looks each up in the disk cache and compiles the rest in spawned processes, with a progress bar.
A second run finds everything cached and compiles nothing. No GPU is needed with ``arch=``.
Scripts calling it at top level need the ``if __name__ == "__main__":`` guard spawn requires.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import multiprocessing
import numbers
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

from . import backends
from ._validate import Problem
from .backends import _flash_kernels, _flash_tiles, _gather, _guard, _mea_kernels, _prologue
from .errors import CompileError, ToolchainError
from .jit import cache, compiler, find_toolchain, get_spec
from .jit.registry import arch_number

logger = logging.getLogger("cupy_paged.jit")

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


@dataclass(frozen=True)
class PrecompileSummary:
    """What a precompile did: ``compiled`` and ``cached`` are ``CompiledVariant``s."""

    archs: tuple
    compiled: tuple
    cached: tuple
    skipped: tuple
    seconds: float
    cache_dir: str

    @property
    def total(self):
        return len(self.compiled) + len(self.cached)

    def __str__(self):
        archs = ", ".join(self.archs)
        lines = [f"skipped {s}" for s in self.skipped]
        if self.total == 0:
            lines.append(f"nothing to build for {archs}")
        elif not self.compiled:
            lines.append(f"all {self.total} kernels for {archs} are already cached in "
                         f"{self.cache_dir}; nothing compiled ({self.seconds:.1f} s)")
        else:
            lines.append(f"compiled {len(self.compiled)}, cached {len(self.cached)}, skipped "
                         f"{len(self.skipped)} for {archs} in {self.seconds:.1f} s "
                         f"(cache {self.cache_dir})")
        return "\n".join(lines)


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
                            names.setdefault((name, arch), None)
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
        for q_len in _PROBE_Q_LENS:
            names.append(_flash_kernels.variant_name(with_q_len(problem, q_len), sm))
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
        from .info import gpu_unavailable   # info imports this module

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


# ---------------------------------------------------------------- building


def precompile(dtypes=None, head_sizes=None, num_heads=None, kv_num_heads=None,
               block_sizes=None, all=False, arch=None, jobs=None, progress=True):
    """Compile every kernel a model needs into the disk cache; returns a ``PrecompileSummary``.

    dtypes: "float16" / "bfloat16" (default both). head_sizes: the model's H values (or
    ``all=True`` for every instantiated kernel). num_heads / kv_num_heads: N and Nkv (their
    ratio G bounds the flash tiles; default: any). block_sizes: the cache's block sizes
    (default 16; kernels take it at run time). arch: "sm_80", 80 or a list of them (default:
    the visible GPUs'). jobs: compile processes (default: CPU count). progress: a tqdm bar
    (plain lines without tqdm) on stderr. Raises ValueError for a bad argument and
    ToolchainError when NVRTC or its headers are missing; a variant NVRTC rejects raises
    CompileError once the running compiles end.
    """
    start = time.perf_counter()
    config = (dtypes, head_sizes, num_heads, kv_num_heads, block_sizes, all)
    check_config(*config)  # argument errors before environment errors
    if jobs is not None:
        jobs = _positive("jobs", jobs)
    archs = check_archs(arch)
    names, skipped = needed_variants(*config, archs=archs)
    buildable, more_skipped = buildable_variants(names)
    cached, todo = [], []
    for spec, arch_ in buildable:
        hit = lookup(spec, arch_)
        (cached if hit is not None else todo).append(hit or (spec, arch_))
    compiled = _compile_all(todo, jobs, progress)
    skipped += more_skipped
    return PrecompileSummary(tuple(archs), tuple(compiled), tuple(cached), tuple(skipped),
                             time.perf_counter() - start, str(cache.cache_dir()))


def lookup(spec, arch, tc=None):
    """The cached ``CompiledVariant`` of ``spec`` for ``arch``, or None (never compiles)."""
    return compiler.cached_variant(spec, arch, tc)


def check_archs(arch):
    """``arch`` (None: the visible GPUs'; an SM or a list of them) as distinct "sm_XY"."""
    if arch is None:
        return gpu_archs()
    archs = [arch] if isinstance(arch, (str, numbers.Integral)) else list(arch)
    if not archs:
        raise ValueError("arch: pass at least one SM, e.g. 'sm_80'")
    return list(dict.fromkeys(check_arch(a) for a in archs))


def buildable_variants(names):
    """([(KernelSpec, arch), ...] this toolchain can build, [Skipped, ...] it cannot): an arch
    NVRTC does not support (NVRTC 13 dropped sm_70) is skipped whole, with one sentence;
    ToolchainError when CuPy (through which NVRTC is reached), NVRTC or the CUDA headers are
    missing."""
    if importlib.util.find_spec("cupy") is None:
        raise ToolchainError("CuPy is not installed (no module named 'cupy'); NVRTC is "
                             "reached through it: pip install cupy-cuda12x (or cupy-cuda13x)")
    tc = find_toolchain()
    supported = nvrtc_archs()
    out, skipped = [], {}
    for name, arch in names:
        spec = get_spec(name)
        if arch_number(arch) not in supported:
            skipped.setdefault(("every kernel", arch), (
                f"NVRTC {tc.nvrtc_version[0]}.{tc.nvrtc_version[1]} cannot build {arch} (it "
                f"builds sm_{min(supported)}..sm_{max(supported)}): install an NVRTC that does"))
        elif spec.unsupported_reason(arch):
            skipped[(name, arch)] = spec.unsupported_reason(arch)
        elif spec.cutlass and tc.cutlass_include is None:
            skipped[(name, arch)] = tc.cutlass_missing
        else:
            out.append((spec, arch))
    return out, [Skipped(what, arch, why) for (what, arch), why in skipped.items()]


def nvrtc_archs():
    """The SM numbers the loaded NVRTC can build (e.g. (50, ..., 121) for 12.9)."""
    from cupy_backends.cuda.libs import nvrtc

    return tuple(int(a) for a in nvrtc.getSupportedArchs())


def _compile_all(todo, jobs, progress):
    """Compile ``[(spec, arch), ...]`` in spawned processes; results in input order."""
    if not todo:
        return []
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    # CUTLASS variants take ~10x longer (9 s against 1 s on one core): start them first.
    order = sorted(range(len(todo)), key=lambda i: not todo[i][0].cutlass)
    results = [None] * len(todo)
    bar = _Progress(len(todo), progress)
    ctx = multiprocessing.get_context("spawn")  # NVRTC and CUDA state do not survive fork
    # Workers stay quiet (compiler.quiet_worker): the bar and this process's log report.
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx,
                               initializer=compiler.quiet_worker)
    try:
        futures = {pool.submit(compiler.compile_variant, *todo[i]): i for i in order}
        for done in as_completed(futures):
            r = done.result()
            results[futures[done]] = r
            logger.info("compiled %s for %s in %.1f s (worker)", r.name, r.arch, r.seconds)
            bar.update(r)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # running NVRTC calls finish first
        raise
    finally:
        bar.close()
    pool.shutdown()
    return results


class _Progress:
    """A tqdm bar on stderr, or one plain line per kernel when tqdm is not installed."""

    def __init__(self, total, enabled):
        self.total, self.enabled, self.done, self.bar = total, enabled, 0, None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            print(f"compiling {total} kernels (install tqdm for a progress bar)",
                  file=sys.stderr, flush=True)
            return
        self.bar = tqdm(total=total, unit="kernel", desc="compiling", file=sys.stderr)

    def update(self, r):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(r.name, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] compiled {r.name} for {r.arch} in "
                  f"{r.seconds:.1f} s", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- command line


def parser():
    p = argparse.ArgumentParser(
        prog="python -m cupy_paged precompile",
        description="Compile the kernels a model needs into the cache "
                    "($CUPY_PAGED_CACHE_DIR, default ~/.cache/cupy_paged) before its first "
                    "call. Variants no backend runs on the arch are skipped with the reason.")
    p.add_argument("--dtype", nargs="+", metavar="D",
                   help="float16 and/or bfloat16 (default: both)")
    p.add_argument("--head-size", nargs="+", type=int, metavar="H",
                   help="the model's head size(s), multiples of 8")
    p.add_argument("--num-heads", type=int, metavar="N", help="query heads (with --kv-heads)")
    p.add_argument("--kv-heads", type=int, metavar="M", help="kv heads (default: --num-heads)")
    p.add_argument("--block-size", nargs="+", type=int, metavar="B",
                   help="cache block size(s) (default 16)")
    p.add_argument("--all", action="store_true",
                   help="every kernel for the arch (all head sizes) instead of --head-size")
    p.add_argument("--jobs", type=int, metavar="J", help="compile processes (default: CPUs)")
    p.add_argument("--arch", nargs="+", metavar="SM",
                   help="e.g. sm_80 sm_90 (default: this machine's GPUs; no GPU needed with it)")
    p.add_argument("--list", action="store_true",
                   help="print the kernels and whether each is cached; compile nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    """``python -m cupy_paged precompile ...``; returns an exit code (2: bad arguments,
    1: toolchain or compile failure, or nothing buildable)."""
    p = parser()
    args = p.parse_args(argv)
    config = {"dtypes": args.dtype, "head_sizes": args.head_size, "num_heads": args.num_heads,
              "kv_num_heads": args.kv_heads, "block_sizes": args.block_size, "all": args.all}
    try:
        if args.list:
            return _list(config, args.arch)
        summary = precompile(**config, arch=args.arch, jobs=args.jobs,
                             progress=not args.no_progress)
    except ValueError as exc:
        p.error(str(exc))
    except (ToolchainError, CompileError) as exc:
        print(f"cupy_paged precompile: {exc}", file=sys.stderr)
        return 1
    print(summary)
    return 0 if summary.total else 1


def _list(config, arch):
    check_config(**config)
    names, skipped = needed_variants(**config, archs=check_archs(arch))
    buildable, more_skipped = buildable_variants(names)
    for spec, arch_ in buildable:
        state = "cached" if lookup(spec, arch_) is not None else "to compile"
        print(f"{spec.name:45s} {arch_:7s} {state}")
    for s in skipped + more_skipped:
        print(f"skipped {s}")
    return 0
