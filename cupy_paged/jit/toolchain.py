"""Find NVRTC and the header trees it compiles against, without importing CuPy or CUTLASS.

``find_toolchain()`` answers once per set of environment overrides ($CUDA_PATH, $CUDA_HOME,
$CUTLASS_PATH, $CUPY_PAGED_SOURCE_DIR). CUDA headers come from a toolkit or the pip wheels;
the set whose CUDA major matches NVRTC's wins, because CUDA 13 headers under NVRTC 12 (or the
reverse) fail in CCCL's version checks. CUTLASS is optional until a kernel that needs it is built.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cupy_paged.errors import ToolchainError

logger = logging.getLogger("cupy_paged.jit")

_FMHA_EXAMPLE = Path("examples") / "41_fused_multi_head_attention"


@dataclass(frozen=True)
class HeaderSet:
    """One coherent CUDA header tree: runtime headers, CCCL (cuda/std) and crt/."""

    origin: str
    cuda_include: Path
    cccl_include: Path
    crt_include: Path
    cuda_version: int  # CUDA_VERSION from cuda.h, e.g. 12090
    cccl_version: int  # CCCL_VERSION, e.g. 2008002


@dataclass(frozen=True)
class Toolchain:
    """NVRTC version plus every directory a cupy_paged kernel may include from."""

    nvrtc_version: tuple[int, int]
    source_dir: Path
    headers: HeaderSet
    cutlass_include: Path | None
    fmha_example: Path | None
    cutlass_version: str  # "4.2.0", or "" when CUTLASS is missing
    cutlass_missing: str  # why CUTLASS is unusable (a sentence with the fix), "" when found

    @property
    def shim_dir(self) -> Path:
        return self.source_dir / "nvrtc_shim"

    def include_dirs(self, cutlass: bool = False) -> tuple[Path, ...]:
        """Search order: our shim, cuda_src, CUDA, CCCL, crt, then CUTLASS and its fMHA example.

        The shim goes first so `<cmath>` and friends resolve to our forwards, never to a host
        libstdc++ header; a directory listed twice (a CUDA 12 toolkit holds all three) appears once.
        """
        dirs = [self.shim_dir, self.source_dir, self.headers.cuda_include,
                self.headers.cccl_include, self.headers.crt_include]
        if cutlass:
            if self.cutlass_include is None or self.fmha_example is None:
                raise ToolchainError(self.cutlass_missing)
            dirs += [self.cutlass_include, self.fmha_example]
        return tuple(dict.fromkeys(dirs))


def find_toolchain() -> Toolchain:
    """The toolchain for the current environment; cached per value of the overriding variables."""
    keys = ("CUDA_PATH", "CUDA_HOME", "CUTLASS_PATH", "CUPY_PAGED_SOURCE_DIR")
    return _find_toolchain(tuple(os.environ.get(k, "") for k in keys))


def clear_toolchain_cache() -> None:
    """Forget found toolchains (after installing a package into the running interpreter)."""
    _find_toolchain.cache_clear()


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library CuPy loads."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:
        raise ToolchainError(
            f"CuPy is not importable ({exc}): pip install cupy-cuda12x (or cupy-cuda13x)") from exc
    try:
        return tuple(int(v) for v in nvrtc.getVersion())
    except Exception as exc:  # the binding raises its own error types when libnvrtc is absent
        raise ToolchainError(
            f"NVRTC could not be loaded ({exc}): pip install nvidia-cuda-nvrtc-cu12 "
            "(or nvidia-cuda-nvrtc for CUDA 13), or install a CUDA toolkit") from exc


@functools.cache
def _find_toolchain(env: tuple[str, ...]) -> Toolchain:
    cuda_path, cuda_home, cutlass_path, source_override = env
    major, minor = nvrtc_version()
    headers = _pick_headers(major, [cuda_path, cuda_home, "/usr/local/cuda"])
    cutlass_root, cutlass_missing = _find_cutlass(cutlass_path)
    cutlass_include = fmha = None
    version = ""
    if cutlass_root is not None:
        cutlass_include, fmha = cutlass_root / "include", cutlass_root / _FMHA_EXAMPLE
        version = _cutlass_version(cutlass_include)
    tc = Toolchain((major, minor), _source_dir(source_override), headers,
                   cutlass_include, fmha, version, cutlass_missing)
    logger.debug("NVRTC %d.%d, CUDA headers %s from %s, CUTLASS %s", major, minor,
                 headers.cuda_version, headers.origin, version or "missing")
    return tc


def source_dir() -> Path:
    """cuda_src: $CUPY_PAGED_SOURCE_DIR, else cupy_paged/cuda_src (wheel), else <repo>/cuda_src."""
    return _source_dir(os.environ.get("CUPY_PAGED_SOURCE_DIR", ""))


def _source_dir(override: str) -> Path:
    if override:
        path = Path(override)
        if not (path / "nvrtc_shim").is_dir():
            raise ToolchainError(
                f"CUPY_PAGED_SOURCE_DIR={override} is not a cupy_paged cuda_src folder "
                "(it has no nvrtc_shim/): point it at a copy of the repository's cuda_src")
        return path.resolve()
    package = Path(__file__).resolve().parents[1]  # cupy_paged/; a wheel installs cuda_src here
    for path in (package / "cuda_src", package.parent / "cuda_src"):
        if path.is_dir():
            return path
    raise ToolchainError(f"cuda_src/ is neither in {package} nor beside it: reinstall cupy_paged")


# ---------------------------------------------------------------- CUDA headers


def _pick_headers(nvrtc_major: int, roots: list[str]) -> HeaderSet:
    found = [h for h in _header_candidates(roots) if h is not None]
    for h in found:
        if h.cuda_version // 1000 == nvrtc_major:
            return h
    if found:
        h = found[0]
        logger.warning("no CUDA %d headers found; using CUDA %d.%d headers from %s with NVRTC %d",
                       nvrtc_major, h.cuda_version // 1000, h.cuda_version % 1000 // 10,
                       h.origin, nvrtc_major)
        return h
    if nvrtc_major >= 13:
        pkgs = "nvidia-cuda-runtime nvidia-cuda-cccl nvidia-cuda-crt (13.x)"
    else:
        pkgs = f"nvidia-cuda-runtime-cu{nvrtc_major} nvidia-cuda-cccl-cu{nvrtc_major} " \
               f"nvidia-cuda-nvcc-cu{nvrtc_major}"
    raise ToolchainError(
        "no complete CUDA header set (cuda_fp16.h, CCCL's cuda/std, crt/) was found in $CUDA_PATH, "
        f"$CUDA_HOME, /usr/local/cuda or the nvidia pip packages: pip install {pkgs}")


def _header_candidates(roots: list[str]):
    """Toolkits first ($CUDA_PATH, $CUDA_HOME, /usr/local/cuda), then pip wheels."""
    for root in dict.fromkeys(r for r in roots if r):
        inc = Path(root) / "include"
        yield _header_set(f"toolkit {root}", inc, _cccl_dir(inc), inc)
    for nvidia in _nvidia_dirs():
        inc13 = nvidia / "cu13" / "include"  # CUDA 13 wheels share one tree
        yield _header_set(f"pip {inc13}", inc13, _cccl_dir(inc13), inc13)
        yield _header_set(f"pip {nvidia} (cu12 wheels)", nvidia / "cuda_runtime" / "include",
                          nvidia / "cuda_cccl" / "include", nvidia / "cuda_nvcc" / "include")


def _cccl_dir(include: Path) -> Path:
    """CUDA 13 moved CCCL to include/cccl; CUDA 12 keeps it in include."""
    return include / "cccl" if (include / "cccl" / "cuda" / "std").is_dir() else include


def _header_set(origin: str, cuda: Path, cccl: Path, crt: Path) -> HeaderSet | None:
    if not ((cuda / "cuda_fp16.h").is_file() and (cccl / "cuda" / "std").is_dir()
            and (crt / "crt" / "host_defines.h").is_file()):
        return None
    version = _define(cuda / "cuda.h", "CUDA_VERSION") or _define(
        cuda / "cuda_runtime_api.h", "CUDART_VERSION")
    cccl_version = _define(cccl / "cuda" / "std" / "__cccl" / "version.h", "CCCL_VERSION")
    if not version:
        return None
    return HeaderSet(origin, cuda.resolve(), cccl.resolve(), crt.resolve(), version, cccl_version)


def _nvidia_dirs() -> list[Path]:
    """Every site-packages/nvidia folder (a namespace package; found, not imported)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def _define(header: Path, name: str) -> int:
    try:
        text = header.read_text(errors="replace")
    except OSError:
        return 0
    m = re.search(rf"^\s*#\s*define\s+{name}\s+(\d+)", text, re.MULTILINE)
    return int(m.group(1)) if m else 0


# ---------------------------------------------------------------- CUTLASS


def _find_cutlass(override: str) -> tuple[Path | None, str]:
    """(root holding include/ and examples/, "") or (None, why not with the fix)."""
    if override:
        root = Path(override)
        if _is_cutlass_root(root):
            return root.resolve(), ""
        return None, (f"CUTLASS_PATH={override} has no include/cutlass/cutlass.h and "
                      f"{_FMHA_EXAMPLE}/kernel_forward.h: point it at a CUTLASS checkout, "
                      "or unset it to use the nvidia-cutlass pip package")
    for root in _cutlass_package_roots():
        if _is_cutlass_root(root):
            return root.resolve(), ""
    return None, ("CUTLASS headers were not found: pip install nvidia-cutlass "
                  "(or set CUTLASS_PATH to a CUTLASS checkout)")


def _cutlass_package_roots() -> list[Path]:
    """cutlass_library/source from the nvidia-cutlass package, located without importing it."""
    roots = []
    try:
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        roots.append(Path(spec.origin).parent / "source")
    try:
        dist = importlib.metadata.distribution("nvidia-cutlass")
        for f in dist.files or ():
            if f.name == "cutlass.h" and f.parent.name == "cutlass" and "source" in f.parts:
                roots.append(Path(dist.locate_file(f)).parents[2])
                break
    except importlib.metadata.PackageNotFoundError:
        pass
    return roots


def _is_cutlass_root(root: Path) -> bool:
    return ((root / "include" / "cutlass" / "cutlass.h").is_file()
            and (root / _FMHA_EXAMPLE / "kernel_forward.h").is_file())


def _cutlass_version(include: Path) -> str:
    version_h = include / "cutlass" / "version.h"
    parts = [_define(version_h, f"CUTLASS_{p}") for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(map(str, parts))
