"""Load compiled variants as CuPy kernels, one module per (device, variant, arch). GPU only."""

from __future__ import annotations

import threading

from cupy_paged.jit.compiler import compile_variant
from cupy_paged.jit.registry import get_spec

_modules: dict = {}  # (device id, name, arch) -> cupy.RawModule
_lock = threading.Lock()


def get_module(name: str, device: int | None = None):
    """The ``cupy.RawModule`` of variant ``name`` on ``device`` (default: the current one).

    Compiles (or reuses the cached cubin) for the device's own arch (its arch-specific target,
    e.g. sm_90a, for a variant that asks for one: ``KernelSpec.arch_features``). The cubin is loaded with
    ``cupy.RawModule(path=...)``, never ``code=``: CuPy would put its bundled CCCL on the include
    path, which clashes with the CUDA/CUTLASS headers our toolchain compiles against.
    """
    import cupy

    dev = cupy.cuda.Device(device)
    arch = get_spec(name).target(int(dev.compute_capability))
    key = (dev.id, name, arch)
    with _lock:
        module = _modules.get(key)
        if module is None:
            path = compile_variant(name, arch).path
            with dev:
                module = cupy.RawModule(path=str(path))
            _modules[key] = module
    return module


def get_function(name: str, entry: str | None = None, device: int | None = None):
    """The ``cupy.RawKernel`` ``entry`` (default: ``name``) of variant ``name`` on ``device``."""
    import cupy

    module = get_module(name, device)
    with cupy.cuda.Device(device):
        return module.get_function(entry or name)
