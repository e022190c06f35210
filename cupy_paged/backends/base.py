"""What a backend is: a declared envelope (capabilities as data) and a planner.

A backend that cannot run a call says why in sentences; ``choose_backend`` collects them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Optional inputs beyond the opset-1 contract, each a field or property of ``_validate.Problem``
# (true when the call uses it); a backend lists those it honours in ``Capabilities.features``.
OPTIONAL_FEATURES = ("head_sink", "slot_mapping", "qk_norm", "rotary_offset", "quantized_cache",
                     "non_causal", "negative_scale", "latent")


@dataclass(frozen=True)
class Capabilities:
    """The envelope a backend supports, as data.

    array_kinds: "numpy" and/or "cupy". dtype_min_sm: dtype -> lowest SM (e.g. 80 for bf16;
    0 on the host). max_head_size: largest H (H % 8 == 0 is checked for every call).
    unavailable: a sentence when the backend is not built into this version, else "".
    features: the optional inputs it honours (``OPTIONAL_FEATURES``: Problem fields).
    """

    array_kinds: frozenset
    dtype_min_sm: dict = field(default_factory=dict)
    max_head_size: int = 1 << 30
    min_block_size: int = 1
    unavailable: str = ""
    features: frozenset = frozenset(OPTIONAL_FEATURES)

    def reasons(self, problem, kind, sm):
        """Sentences saying why this backend cannot run ``problem`` (empty: it can).

        kind: "numpy" or "cupy"; sm: the GPU's compute capability as an int (75, 90), or
        None on the host.
        """
        if kind not in self.array_kinds:
            where = "GPU (CuPy) arrays" if "cupy" in self.array_kinds else "NumPy arrays"
            return [f"runs on {where}, got {kind} arrays"]
        if self.unavailable:
            return [self.unavailable]
        out = []
        need = self.dtype_min_sm.get(problem.dtype)
        if need is None:
            out.append(f"{problem.dtype} is not supported (supported: "
                       f"{', '.join(self.dtype_min_sm)})")
        elif sm is not None and sm < need:
            out.append(f"{problem.dtype} needs sm{need}, this GPU is sm{sm}")
        if problem.head_size > self.max_head_size:
            out.append(f"head_size {problem.head_size} > {self.max_head_size}")
        if problem.block_size < self.min_block_size:
            out.append(f"block_size {problem.block_size} < {self.min_block_size}")
        out += [f"{name} is not supported" for name in OPTIONAL_FEATURES
                if getattr(problem, name) and name not in self.features]
        return out


def gpu_capabilities(dtype_min_sm, max_head_size, features=frozenset()):
    """The envelope of a backend that runs CuPy arrays: dtype -> lowest SM, largest H, the
    optional inputs it honours."""
    return Capabilities(array_kinds=frozenset({"cupy"}), dtype_min_sm=dtype_min_sm,
                        max_head_size=max_head_size, features=frozenset(features))


@dataclass(frozen=True)
class Backend:
    """A named backend: its capabilities and ``make_plan(problem, device, sm, options,
    reason)``, which returns the ``plan.Plan`` of a call it can run (device: GPU id, None on
    the host; sm: its compute capability; options: ``plan.PlanOptions``; reason: the sentence
    saying why this backend was chosen)."""

    name: str
    capabilities: Capabilities
    make_plan: object
