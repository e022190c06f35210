"""The NVRTC toolchain: find headers, name kernel variants, compile them to cached cubins, load them.

Imports with NumPy alone; NVRTC (through CuPy's low-level binding) and CuPy load on first use.
"""

from cupy_paged.jit.compiler import CompiledVariant, compile_many, compile_variant
from cupy_paged.jit.loader import get_function, get_module
from cupy_paged.jit.registry import KernelSpec, all_specs, get_spec, normalize_arch, register
from cupy_paged.jit.toolchain import Toolchain, clear_toolchain_cache, find_toolchain

__all__ = [
    "CompiledVariant", "KernelSpec", "Toolchain", "all_specs", "clear_toolchain_cache",
    "compile_many", "compile_variant", "find_toolchain", "get_function", "get_module", "get_spec",
    "normalize_arch", "register",
]
