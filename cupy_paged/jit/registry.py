"""Kernel variants by name: what to compile (source, generated entry, defines, options, archs).

One name per instantiation, used as the extern "C" symbol, the cache file name and the log
line. Backends call ``register`` at import; this module registers the smoke kernel and the
CUTLASS fMHA probes that prove the toolchain.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ARCH = re.compile(r"(?:sm_)?(\d+)([af]?)")


@dataclass(frozen=True)
class KernelSpec:
    """One kernel instantiation.

    ``source`` is relative to cuda_src (e.g. ``smoke/axpy.cu``); the compiled program is
    ``#include "<source>"`` followed by ``entry_code``, the generated ``extern "C"`` entries.
    ``defines`` become ``-DNAME=VALUE``; ``min_arch``/``archs`` bound the SMs it is built for
    (``archs`` empty: any arch >= ``min_arch``); ``cutlass`` puts CUTLASS on the include path;
    ``arch_features`` "a" builds the arch-specific target (sm_90a: wgmma, setmaxnreg), which
    runs on that compute capability only.
    """

    name: str
    source: str
    entry_code: str
    defines: tuple[tuple[str, str], ...] = ()
    options: tuple[str, ...] = ()
    min_arch: int = 0
    archs: tuple[int, ...] = ()
    cutlass: bool = False
    arch_features: str = ""

    def __post_init__(self):
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"kernel name {self.name!r} must be a C identifier "
                             "(it is the extern \"C\" symbol and the cache file name)")
        if isinstance(self.defines, Mapping):
            object.__setattr__(self, "defines",
                               tuple((str(k), str(v)) for k, v in sorted(self.defines.items())))

    def unsupported_reason(self, arch: str | int) -> str:
        """"" if this variant can be built for ``arch``, else a sentence saying why not."""
        number = arch_number(arch)
        if number < self.min_arch:
            return f"{self.name} needs sm_{self.min_arch} or newer (asked for {normalize_arch(arch)})"
        if self.archs and number not in self.archs:
            listed = ", ".join(f"sm_{a}" for a in self.archs)
            return f"{self.name} is built only for {listed} (asked for {normalize_arch(arch)})"
        return ""

    def target(self, sm: int) -> str:
        """The NVRTC target this variant builds for a GPU of compute capability ``sm`` (e.g.
        90 -> "sm_90", or "sm_90a" for an arch-specific variant)."""
        return f"sm_{int(sm)}{self.arch_features}"


def normalize_arch(arch: str | int) -> str:
    """80, "80", "sm_80" -> "sm_80"; "sm_90a" keeps its suffix."""
    m = _ARCH.fullmatch(str(arch).strip().lower())
    if not m:
        raise ValueError(f"arch {arch!r} is not an SM name: pass e.g. 'sm_80' or 80")
    return f"sm_{m.group(1)}{m.group(2)}"


def arch_number(arch: str | int) -> int:
    """"sm_90a" -> 90."""
    return int(_ARCH.fullmatch(normalize_arch(arch)).group(1))


_SPECS: dict[str, KernelSpec] = {}


def register(spec: KernelSpec) -> KernelSpec:
    """Add ``spec``; registering the same spec twice is fine, a different one under its name is not."""
    old = _SPECS.get(spec.name)
    if old is not None and old != spec:
        raise ValueError(f"a different kernel is already registered as {spec.name!r}")
    _SPECS[spec.name] = spec
    return spec


def get_spec(name: str) -> KernelSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise KeyError(f"no kernel variant named {name!r}; registered: "
                       f"{', '.join(sorted(_SPECS)) or 'none'}") from None


def all_specs() -> list[KernelSpec]:
    return [_SPECS[n] for n in sorted(_SPECS)]


# ---------------------------------------------------------------- built-in variants


def _smoke_spec(suffix: str, ctype: str) -> KernelSpec:
    name = f"smoke_axpy_{suffix}"
    entry = (f'extern "C" __global__ void {name}(int n, float a, const {ctype}* x, {ctype}* y) {{\n'
             f"  cupy_paged::smoke::axpy<{ctype}>(n, a, x, y);\n}}\n")
    return KernelSpec(name, "smoke/axpy.cu", entry)


def _fmha_probe_spec(arch_tag: int, queries: int, keys: int) -> KernelSpec:
    """AttentionKernel<half_t, Sm<arch_tag>, aligned, queries, keys, kMaxK=keys, no dropout/bias>.

    kMaxK = kKeysPerBlock makes it the single-value-iteration kernel for head_dim <= keys.
    """
    name = f"mea_probe_fmha_f16_sm{arch_tag}_q{queries}_k{keys}"
    ak = (f"AttentionKernel<cutlass::half_t, cutlass::arch::Sm{arch_tag}, true, "
          f"{queries}, {keys}, {keys}, false, false>")
    entry = (f"using {name}_t = {ak};\n"
             f'extern "C" __global__ void __launch_bounds__({name}_t::kNumThreads, '
             f"{name}_t::kMinBlocksPerSm)\n"
             f"{name}(typename {name}_t::Params p) {{\n"
             f"  cupy_paged::mea::fmha_forward_block<{name}_t>(p);\n}}\n")
    # CUTLASS leaves constexpr helpers unannotated; NVRTC calls those host functions unless
    # -default-device makes them device functions.
    return KernelSpec(name, "mea/cutlass_fmha_probe.cu", entry, options=("-default-device",),
                      min_arch=arch_tag, cutlass=True)


for _suffix, _ctype in (("f16", "__half"), ("f32", "float")):
    register(_smoke_spec(_suffix, _ctype))
for _tag, _q, _k in ((50, 64, 64), (70, 64, 64), (75, 64, 64), (80, 64, 64), (80, 64, 128)):
    register(_fmha_probe_spec(_tag, _q, _k))
