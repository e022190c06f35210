"""Compile a registered kernel variant to a cubin with NVRTC, through the disk cache.

This and loader.py are the only modules that touch NVRTC or CuPy, both imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
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
    options = build_options(spec, arch, tc, lineinfo)
    source = program_source(spec)
    key = cache_key(spec, arch, tc, source, options)
    entry = cache.Entry.of(spec.name, arch, key)
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
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        results = list(pool.map(compile_variant, *zip(*work)))
    for r in results:  # spawned workers have no logging configured; report their compiles here
        if not r.cached:
            logger.info("compiled %s for %s in %.1f s (worker)", r.name, r.arch, r.seconds)
    return results


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
    if lineinfo:
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
