"""What this machine offers cupy_paged: ``python -m cupy_paged info``.

``collect()`` gathers the GPU, CuPy, the NVRTC toolchain (versions and paths), the kernel cache
and, for each backend, "available" or the sentences saying why not here (its capabilities'
reasons, plus what the machine lacks: a GPU, NVRTC, CUTLASS). ``format_info`` prints it.
Every part is optional: with no GPU, or no CuPy at all, each section says what is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__, backends
from .backends.base import OPTIONAL_FEATURES
from ._precompile import backend_variants, representative_problem

# The representative calls whose support is reported: a Llama-like layer (N=32, Nkv=8,
# H=128, block 16), once per GPU dtype.
PROBE = {"head_size": 128, "num_heads": 32, "kv_num_heads": 8, "block_size": 16}
PROBE_DTYPES = ("float16", "bfloat16")
# What CUDA answers on a machine without an NVIDIA driver (cudaErrorInsufficientDriver, as if
# the driver were too old) or without a device (cudaErrorNoDevice).
_INSUFFICIENT_DRIVER, _NO_DEVICE = 35, 100
NUMPY_FALLBACK = "running the NumPy reference"
ENV_VARS = ("CUPY_PAGED_BACKEND", "CUPY_PAGED_VALIDATE", "CUPY_PAGED_CACHE_DIR",
            "CUPY_PAGED_SOURCE_DIR", "CUPY_PAGED_QUIET", "CUTLASS_PATH", "CUDA_PATH",
            "CUDA_HOME", "CUDA_VISIBLE_DEVICES")


def collect() -> dict:
    """Everything ``info`` reports, as a JSON-serialisable dict; never raises.

    A section that could not be read holds {"error": sentence} instead of its fields.
    """
    info = {
        "cupy_paged": {"version": __version__, "path": str(Path(__file__).resolve().parent)},
        "python": {"version": sys.version.split()[0], "path": sys.executable},
        "cupy": _cupy(),
        "gpu": _gpu(),
        "toolchain": _toolchain(),
        "cache": _cache(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }
    info["backends"] = _backends(info["gpu"], info["toolchain"])
    info["features"] = features()
    return info


def features() -> dict:
    """{optional input: [backends that honour it]} for the inputs beyond the opset-1 contract
    (``backends.base.OPTIONAL_FEATURES``); a backend missing from a list refuses calls that
    use that input, by name."""
    return {name: [b for b, backend in backends.BACKENDS.items()
                   if name in backend.capabilities.features]
            for name in OPTIONAL_FEATURES}


def format_info(info: dict) -> str:
    """The report ``python -m cupy_paged info`` prints, from ``collect()``'s dict."""
    rows = [("cupy_paged", _versioned(info["cupy_paged"])),
            ("Python", _versioned(info["python"])),
            ("CuPy", _versioned(info["cupy"]))]
    gpu = info["gpu"]
    if "error" in gpu:
        rows.append(("GPU", gpu["error"]))
    for d in gpu.get("devices", ()):
        rows.append((f"GPU {d['index']}",
                     f"{d['name']}, sm_{d['sm']}, {d['memory_gib']:.1f} GiB"))
    if "driver" in gpu:
        rows.append(("CUDA driver", f"{gpu['driver']}, runtime {gpu['runtime']}"))
    tc = info["toolchain"]
    if "error" in tc:
        rows.append(("NVRTC", f"not usable: {tc['error']}"))
    else:
        archs = tc["nvrtc"]["archs"]
        built = f", builds sm_{archs[0]}..sm_{archs[-1]}" if archs else ""
        rows += [("NVRTC", _versioned(tc["nvrtc"]) + built),
                 ("CUDA headers",
                  f"{tc['cuda_headers']['version']} ({tc['cuda_headers']['origin']})"),
                 ("CCCL", _versioned(tc["cccl"])),
                 ("CUTLASS", _versioned(tc["cutlass"])),
                 ("cuda_src", tc["source_dir"])]
    c = info["cache"]
    if "error" in c:
        rows.append(("cache", c["error"]))
    else:
        per_arch = ", ".join(f"{a}: {n}" for a, n in c["kernels_by_arch"].items())
        kernels = f"{c['kernels']} kernels" + (f" ({per_arch})" if per_arch else "")
        size = f"{c['files']} files, {c['bytes'] / 1e6:.1f} MB"
        rows.append(("cache", f"{c['dir']}: {kernels}, {size}"))
    for k, v in info["env"].items():
        rows.append(("env", f"{k}={v}"))
    width = max(len(k) for k, _ in rows) + 2
    lines = [f"{k:{width}s}{v}" for k, v in rows]

    b = info["backends"]
    lines.append(f"backends ({' and '.join(PROBE_DTYPES)}, head_size {PROBE['head_size']}, "
                 f"block_size {PROBE['block_size']}, {b['where']}):")
    for name, by_dtype in b["by_backend"].items():
        states = {dtype: ("available" if not why else "; ".join(why))
                  for dtype, why in by_dtype.items()}
        if len(set(states.values())) == 1:
            lines.append(f"  {name:10s} {next(iter(states.values()))}")
        else:
            for i, (dtype, state) in enumerate(states.items()):
                lines.append(f"  {name if i == 0 else '':10s} {dtype}: {state}")
    lines.append("optional inputs (backends that take them):")
    for name, names in info.get("features", {}).items():
        lines.append(f"  {name:10s} {', '.join(names) or 'none'}")
    return "\n".join(lines)


def main(argv=None):
    """``python -m cupy_paged info [--json]``; returns 0."""
    p = argparse.ArgumentParser(prog="python -m cupy_paged info",
                                description="GPU, toolchain, kernel cache and backends here.")
    p.add_argument("--json", action="store_true", help="print collect()'s dict as JSON")
    args = p.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


# ---------------------------------------------------------------- sections


def _versioned(section):
    if "error" in section:
        return section["error"]
    path = section.get("path")
    return f"{section['version']} ({path})" if path else section["version"]


def _cupy():
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library failing to load
        return {"error": f"not importable ({type(exc).__name__}: {exc}): pip install "
                         "'cupy-paged[cuda12]' (or [cuda13]); NumPy arrays still run the "
                         "reference"}
    return {"version": cupy.__version__, "path": str(Path(cupy.__file__).parent)}


def _gpu():
    try:
        import cupy
    except Exception:
        return {"error": "no GPU: CuPy is not importable"}
    try:
        runtime = cupy.cuda.runtime
        count = runtime.getDeviceCount()
        devices = []
        for i in range(count):
            props = runtime.getDeviceProperties(i)
            name = props["name"]
            devices.append({"index": i, "name": name.decode() if isinstance(name, bytes)
                            else str(name), "sm": props["major"] * 10 + props["minor"],
                            "memory_gib": props["totalGlobalMem"] / 2 ** 30})
        versions = {"driver": _cuda_version(runtime.driverGetVersion()),
                    "runtime": _cuda_version(runtime.runtimeGetVersion())}
    except Exception as exc:  # CUDARuntimeError: no driver, driver too old, no device
        return {"error": f"{gpu_unavailable(exc)}; {NUMPY_FALLBACK}"}
    if not devices:
        return {"error": f"{gpu_unavailable(None)}; {NUMPY_FALLBACK}"}
    return {"devices": devices, "current": cupy.cuda.Device().id, **versions}


def gpu_unavailable(exc):
    """Why CUDA offers no GPU, in a user's words: "no NVIDIA driver/GPU found" when this machine
    has no driver or no device (``exc`` is None, or CUDA's cudaErrorInsufficientDriver with no
    driver installed, or cudaErrorNoDevice), a driver older than CuPy's CUDA runtime when that
    is what CUDA means, else "no GPU: " and CUDA's own message."""
    status = getattr(exc, "status", None)
    if exc is None or status == _NO_DEVICE:     # a driver, but no device it lets us see
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return "no NVIDIA driver/GPU found" + (
            f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
    if status == _INSUFFICIENT_DRIVER:
        try:
            import cupy
            driver = cupy.cuda.runtime.driverGetVersion()   # 0: no driver installed
            runtime = cupy.cuda.runtime.runtimeGetVersion()
        except Exception:
            driver = runtime = 0
        if driver == 0:
            return "no NVIDIA driver/GPU found"
        return (f"no GPU: the NVIDIA driver supports CUDA {_cuda_version(driver)}, older than "
                f"CuPy's CUDA runtime {_cuda_version(runtime)}; upgrade the driver or install "
                "the CuPy of an older CUDA")
    return f"no GPU: {exc}"


def _toolchain():
    from .errors import ToolchainError
    from .jit import find_toolchain
    from ._precompile import nvrtc_archs

    try:
        tc = find_toolchain()
        archs = list(nvrtc_archs())
    except ToolchainError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # an NVRTC binding failing in its own way
        return {"error": f"{type(exc).__name__}: {exc}"}
    h = tc.headers
    cutlass = ({"version": tc.cutlass_version, "path": str(tc.cutlass_include)}
               if tc.cutlass_include is not None else {"error": tc.cutlass_missing})
    return {
        "nvrtc": {"version": "{}.{}".format(*tc.nvrtc_version), "path": _loaded("libnvrtc"),
                  "archs": archs},
        "cuda_headers": {"version": _cuda_version(h.cuda_version), "origin": h.origin,
                         "path": str(h.cuda_include)},
        "cccl": {"version": _cccl_version(h.cccl_version), "path": str(h.cccl_include)},
        "cutlass": cutlass,
        "source_dir": str(tc.source_dir),
    }


def _cache():
    from .jit.cache import cache_dir

    try:
        root = cache_dir()
        files = [p for p in root.iterdir() if p.is_file()]
    except OSError as exc:
        return {"error": f"cache directory not usable: {exc}"}
    by_arch = {}
    for p in files:
        if p.suffix == ".cubin":  # <name>-<arch>-<key16>.cubin (jit/cache.py)
            parts = p.stem.rsplit("-", 2)
            arch = parts[1] if len(parts) == 3 else "?"
            by_arch[arch] = by_arch.get(arch, 0) + 1
    return {"dir": str(root), "files": len(files),
            "bytes": sum(p.stat().st_size for p in files),
            "kernels": sum(by_arch.values()), "kernels_by_arch": dict(sorted(by_arch.items()))}


def _backends(gpu, tc):
    """{"where": sentence, "by_backend": {name: {dtype: [reasons]}}}: capabilities' reasons on
    this machine's GPU, plus what the machine lacks for the kernels the backend would build."""
    sm = None
    if "devices" in gpu:
        device = next(d for d in gpu["devices"] if d["index"] == gpu["current"])
        sm = device["sm"]
        where = f"on GPU {device['index']} (sm_{sm})"
    else:
        where = "on this machine, which has no GPU"
    out = {}
    for name, backend in backends.BACKENDS.items():
        caps = backend.capabilities
        out[name] = {}
        for dtype in PROBE_DTYPES:
            problem = representative_problem(dtype, PROBE["head_size"], PROBE["num_heads"],
                                             PROBE["kv_num_heads"], PROBE["block_size"])
            if "numpy" in caps.array_kinds:
                out[name][dtype] = caps.reasons(problem, "numpy", None)
            elif sm is None:
                out[name][dtype] = [gpu["error"]]
            else:
                why = caps.reasons(problem, "cupy", sm)
                out[name][dtype] = why or _build_reasons(name, problem, sm, tc)
    return {"where": where, "by_backend": out}


def _build_reasons(backend, problem, sm, tc):
    """Why this machine cannot build ``backend``'s kernels for ``problem`` on sm (empty: it can)."""
    if "error" in tc:
        return [f"its kernels cannot be compiled: {tc['error']}"]
    from .jit import get_spec

    arch, why = f"sm_{sm}", []
    if sm not in tc["nvrtc"]["archs"]:
        why.append(f"NVRTC {tc['nvrtc']['version']} cannot build {arch}: install an NVRTC "
                   "that does")
    for name in backend_variants(backend, problem, sm):
        spec = get_spec(name)
        reason = spec.unsupported_reason(arch) or (
            tc["cutlass"]["error"] if spec.cutlass and "error" in tc["cutlass"] else "")
        if reason and reason not in why:
            why.append(reason)
    return why


def _cuda_version(v):
    """12090 -> "12.9"."""
    return f"{v // 1000}.{v % 1000 // 10}"


def _cccl_version(v):
    """2008002 -> "2.8.2" (CCCL_VERSION is major * 1000000 + minor * 1000 + patch)."""
    return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}" if v else "unknown"


def _loaded(stem):
    """Path of the shared library ``stem`` this process has loaded (Linux), else ""."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if Path(path).name.startswith(stem + "."):
                    return path
    except OSError:
        pass
    return ""
