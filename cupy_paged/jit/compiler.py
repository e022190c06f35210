"""Compile a registered kernel variant to a cubin with NVRTC, through the disk cache.

This and loader.py are the only modules that touch NVRTC or CuPy, both imported lazily.

Every NVRTC compile logs "compiling <name> for <arch> ..." and "compiled ... in N s" (logger
``cupy_paged.jit``, INFO), so a first call that compiles for a minute never looks like a hang.
When the application configured no logging at all, those two lines go to stderr through a
handler attached to ``cupy_paged.jit`` alone (see ``show_compiles``); ``CUPY_PAGED_QUIET=1``
turns that off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cupy_paged.errors import CompileError, ToolchainError
from cupy_paged.jit import cache
from cupy_paged.jit.registry import KernelSpec, arch_number, get_spec, normalize_arch
from cupy_paged.jit.toolchain import Toolchain, find_toolchain

logger = logging.getLogger("cupy_paged.jit")
QUIET_ENV = "CUPY_PAGED_QUIET"
LINEINFO_ENV = "CUPY_PAGED_LINEINFO"  # "1": compile with -lineinfo (source view in Nsight Compute)
_stderr_handler: logging.Handler | None = None  # attached by show_compiles, else None
_stderr_lock = threading.Lock()


@dataclass(frozen=True)
class CompiledVariant:
    """A cubin on disk. ``seconds`` is this call's wall time: the NVRTC compile, or the cache lookup."""

    name: str
    arch: str
    path: Path
    seconds: float
    cached: bool


def compile_variant(spec: str | KernelSpec, arch: str | int = "sm_80",
                    lineinfo: bool = False) -> CompiledVariant:
    """Build ``spec`` (a KernelSpec or a registered name) for ``arch``, or reuse the cached cubin.

    Raises ValueError for an arch the variant does not support, ToolchainError when NVRTC or a
    header set is missing, CompileError (variant, arch, full NVRTC log) when NVRTC rejects it.
    """
    start = time.perf_counter()
    spec = get_spec(spec) if isinstance(spec, str) else spec
    arch = normalize_arch(arch)
    reason = spec.unsupported_reason(arch)
    if reason:
        raise ValueError(reason)
    tc = find_toolchain()
    entry, source, options = _cache_entry(spec, arch, tc, lineinfo)
    if cache.load(entry) is None:
        with cache.locked(entry):
            if cache.load(entry) is None:  # another process may have built it while we waited
                cubin, seconds = _nvrtc_compile(spec, arch, tc, source, options)
                cache.store(entry, cubin, {"name": spec.name, "arch": arch, "seconds": seconds,
                                           "nvrtc": "{}.{}".format(*tc.nvrtc_version)})
                return CompiledVariant(spec.name, arch, entry.cubin, seconds, cached=False)
    seconds = time.perf_counter() - start
    logger.debug("cache hit: %s for %s (%s)", spec.name, arch, entry.cubin.name)
    return CompiledVariant(spec.name, arch, entry.cubin, seconds, cached=True)


def cached_variant(spec: str | KernelSpec, arch: str | int = "sm_80",
                   tc: Toolchain | None = None) -> CompiledVariant | None:
    """The cached cubin of ``spec`` for ``arch`` (same key and verified load as
    ``compile_variant``), or None; never compiles."""
    start = time.perf_counter()
    spec = get_spec(spec) if isinstance(spec, str) else spec
    arch = normalize_arch(arch)
    entry, _, _ = _cache_entry(spec, arch, tc or find_toolchain())
    if cache.load(entry) is None:
        return None
    return CompiledVariant(spec.name, arch, entry.cubin, time.perf_counter() - start, cached=True)


def _cache_entry(spec: KernelSpec, arch: str, tc: Toolchain, lineinfo: bool = False):
    """(cache entry, program source, NVRTC options) of one variant for one arch."""
    options = build_options(spec, arch, tc, lineinfo)
    source = program_source(spec)
    return cache.Entry.of(spec.name, arch, cache_key(spec, arch, tc, source, options)), \
        source, options


def compile_many(items: Iterable[tuple[str | KernelSpec, str | int]],
                 jobs: int | None = None) -> list[CompiledVariant]:
    """Compile ``[(name_or_spec, arch), ...]`` in parallel processes, in input order.

    Workers are spawned (never forked: NVRTC and CUDA state do not survive fork) and receive
    KernelSpecs, so variants registered only in this process build too. Scripts calling this
    at top level need the usual ``if __name__ == "__main__":`` guard that spawn requires.
    """
    work = [(get_spec(s) if isinstance(s, str) else s, normalize_arch(a)) for s, a in items]
    jobs = min(jobs or os.cpu_count() or 1, len(work))
    if jobs <= 1:
        return [compile_variant(s, a) for s, a in work]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=quiet_worker) as pool:
        results = list(pool.map(compile_variant, *zip(*work)))
    show_compiles()
    for r in results:  # spawned workers are kept quiet; report their compiles here, once
        if not r.cached:
            logger.info("compiled %s for %s in %.1f s (worker)", r.name, r.arch, r.seconds)
    return results


def show_compiles() -> None:
    """Make the INFO compile lines visible when the application configured no logging at all.

    "No logging at all": the root and ``cupy_paged`` loggers have no handlers, and
    ``cupy_paged.jit`` has no handler or level of its own. Then one stderr handler at INFO is
    attached to ``cupy_paged.jit`` only (nothing else in the process starts printing). Once the
    application configures logging, or sets ``CUPY_PAGED_QUIET=1``, it is detached at the next
    compile, so no line ever prints twice. Called before each NVRTC compile.
    """
    global _stderr_handler
    with _stderr_lock:
        ours = _stderr_handler
        own_level = logging.INFO if ours is not None else logging.NOTSET
        configured = (logging.root.handlers or logging.getLogger("cupy_paged").handlers
                      or any(h is not ours for h in logger.handlers) or logger.level != own_level)
        quiet = os.environ.get(QUIET_ENV, "") not in ("", "0")
        if ours is None and not (configured or quiet):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("cupy_paged: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            _stderr_handler = handler
        elif ours is not None and (configured or quiet):
            logger.removeHandler(ours)
            if logger.level == logging.INFO:
                logger.setLevel(logging.NOTSET)
            _stderr_handler = None


def quiet_worker() -> None:
    """Pool initializer: a worker's compiles are reported by its parent, not on its own stderr."""
    os.environ[QUIET_ENV] = "1"


def program_source(spec: KernelSpec) -> str:
    """The text handed to NVRTC: the variant's source file, then its generated entry points."""
    return (f"// cupy_paged.jit: {spec.name}\n"
            f'#include "{spec.source}"\n\n{spec.entry_code}')


def build_options(spec: KernelSpec, arch: str, tc: Toolchain, lineinfo: bool = False) -> list[str]:
    """NVRTC options: arch, C++17, the include path (toolchain order), defines, spec options."""
    options = [f"--gpu-architecture={arch}", "-std=c++17"]
    options += [f"-I{d}" for d in tc.include_dirs(cutlass=spec.cutlass)]
    options += [f"-D{k}={v}" for k, v in spec.defines]
    options += list(spec.options)
    if lineinfo or os.environ.get(LINEINFO_ENV, "") not in ("", "0"):
        options.append("-lineinfo")
    return options


def cache_key(spec: KernelSpec, arch: str, tc: Toolchain, source: str, options: list[str]) -> str:
    """sha256 over everything that can change the cubin (see STYLE.md principle 3)."""
    payload = {
        "cuda_src": cache.digest_tree(tc.source_dir),
        "program": source,
        "options": options,
        "arch": arch,
        "nvrtc": list(tc.nvrtc_version),
        "cuda_headers": [tc.headers.cuda_version, tc.headers.cccl_version],
        "cutlass": tc.cutlass_version if spec.cutlass else "",
        "cupy_paged": _package_version(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _nvrtc_compile(spec: KernelSpec, arch: str, tc: Toolchain, source: str,
                   options: list[str]) -> tuple[bytes, float]:
    from cupy_backends.cuda.libs import nvrtc

    supported = nvrtc.getSupportedArchs()
    if arch_number(arch) not in supported:
        raise ToolchainError(
            f"NVRTC {tc.nvrtc_version[0]}.{tc.nvrtc_version[1]} cannot build {arch} (it builds "
            f"sm_{min(supported)}..sm_{max(supported)}): install an NVRTC that supports it")
    show_compiles()
    logger.info("compiling %s for %s ...", spec.name, arch)
    start = time.perf_counter()
    prog = nvrtc.createProgram(source, f"{spec.name}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as exc:
            raise CompileError(
                f"NVRTC failed to compile {spec.name} for {arch} ({exc}); source "
                f"cuda_src/{spec.source}, options {' '.join(options)}\n"
                f"{nvrtc.getProgramLog(prog)}") from None
        cubin = bytes(nvrtc.getCUBIN(prog))
        log = nvrtc.getProgramLog(prog).strip()
    finally:
        nvrtc.destroyProgram(prog)
    seconds = time.perf_counter() - start
    logger.info("compiled %s for %s in %.1f s", spec.name, arch, seconds)
    if log:
        logger.debug("NVRTC log for %s (%s):\n%s", spec.name, arch, log)
    return cubin, seconds


def _package_version() -> str:
    try:
        import cupy_paged
    except ImportError:
        return "0"
    return str(getattr(cupy_paged, "__version__", "0"))
