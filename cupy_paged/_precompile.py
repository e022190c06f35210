"""Build the kernels a model needs before its first call: ``python -m cupy_paged precompile``.

``precompile(...)`` works out the variants ``paged_attention`` can pick for a model's dtypes and
head sizes on an arch (``needed_variants``), skips those no backend can run there (saying why),
looks each up in the disk cache and compiles the rest in spawned processes, with a progress bar.
A second run finds everything cached and compiles nothing. No GPU is needed with ``arch=``.
Scripts calling it at top level need the ``if __name__ == "__main__":`` guard spawn requires.

This module builds (cache look-ups, spawned compiles, the progress bar) and holds the command
line; which variants a model needs, and the argument checks, are in _precompile_variants.py,
every name of which is importable from here too.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import multiprocessing
import numbers
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

# which variants a model needs (pure policy), in _precompile_variants; every name re-exported
from ._precompile_variants import _ALIASES, _PLAIN_ARCH, _PROBE_Q_LENS  # noqa: F401
from ._precompile_variants import DTYPES, GPU_BACKENDS, Skipped  # noqa: F401
from ._precompile_variants import _dtype, _positive, _target_reasons  # noqa: F401
from ._precompile_variants import backend_variants, check_arch, check_config  # noqa: F401
from ._precompile_variants import gpu_archs, needed_variants, with_q_len  # noqa: F401
from ._precompile_variants import representative_problem  # noqa: F401
from .errors import CompileError, ToolchainError
from .jit import cache, compiler, find_toolchain, get_spec
from .jit.registry import arch_number

logger = logging.getLogger("cupy_paged.jit")


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
