"""A plan: everything one call of a given signature does, decided once.

A backend's ``make_plan(problem, device, options)`` returns a frozen ``Plan``: the backend, why
it was chosen, and the ordered steps of the call (for a GPU backend: the metadata guard, the
prologue, the attention kernels), each holding its prepared launches (grid, packed parameter
struct, programmatic or not). ``Plan.run(arrays, out)`` only supplies the call's arrays.
``backends.plan_for`` keeps the one cache of plans; ``cupy_paged.plan`` is the public form.

``PlanOptions`` are the explicit choices tests, benchmarks and servers may make instead of the
heuristics (like FlashInfer's ``plan(...)`` arguments or xformers' ``op=``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import _buffers
from . import _capture


@dataclass(frozen=True)
class PlanOptions:
    """Choices that override a backend's heuristics (None: the heuristic decides).

    tile: flash only, a ``cupy_paged.backends.Tile`` (the kernel instantiation to run).
    num_splits: flash only, key splits per work unit (1: no split-KV).
    programmatic: flash only, launch each kernel programmatically behind the previous one
      (sm90+; ignored where the driver or GPU cannot). None: when the call's estimated GPU
      time reaches ``CUPY_PAGED_OVERLAP_MIN_US`` (default 50 us) and ``CUPY_PAGED_PDL`` is
      not "0".
    arch_tag: mea only, the CUTLASS arch tag (50, 70, 75 or 80) whose kernel runs, e.g. the
      Sm75 kernel on a newer GPU.
    kernel: flash only, the kernel family: "sm80" (mma.sync, sm80 and newer) or "sm90a"
      (warpgroup MMA, compute capability 9.0 only, one key split). None: the policy's choice
      (sm90a for prefill-shaped calls on 9.0).
    """

    tile: object = None
    num_splits: int | None = None
    programmatic: bool | None = None
    arch_tag: int | None = None
    kernel: str | None = None

    def check(self, backend, allowed):
        """ValueError naming the first option set that ``backend`` does not take."""
        for name in ("tile", "num_splits", "programmatic", "arch_tag", "kernel"):
            if getattr(self, name) is not None and name not in allowed:
                raise ValueError(f"options.{name}: the {backend} backend does not take it "
                                 f"(it takes {', '.join(allowed) or 'no options'})")


DEFAULT_OPTIONS = PlanOptions()


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a plan, as facts: the variant, grid, block, dynamic shared memory
    and whether it starts programmatically behind the kernel before it. grid and block are
    () for a launch sized per call (mea's, from the metadata's sizes)."""

    kernel: str
    grid: tuple
    block: tuple
    shared_mem: int = 0
    programmatic: bool = False


class Call:
    """The state of one call as its steps pass it on: the arrays by argument name, the output,
    the stream handle the launches go to (None: the current CuPy stream), the device address
    of every argument (``ptr``: name -> int, 0 for None, "out" the output's; read once by a
    GPU plan), the guard's verdict (None until the guard ran, and without one) and the query
    the attention reads (``q``, ``q_ptr``: the prologue's rotated copy, or the input)."""

    __slots__ = ("a", "fault", "out", "ptr", "q", "q_ptr", "stream")

    def __init__(self, arrays, out, stream=None, ptr=None):
        self.a, self.out, self.stream, self.ptr = arrays, out, stream, ptr
        self.fault, self.q = None, arrays["query"]
        self.q_ptr = None if ptr is None else ptr["query"]


@dataclass(frozen=True)
class Plan:
    """One call signature's work on one device, decided once.

    backend: its name; reason: why it runs this call; problem: the validated ``Problem``;
    device: the GPU id (None on the host); options: the ``PlanOptions`` it was made with;
    steps: callables ``step(call)`` run in order; launches: ``Launch`` facts of every kernel
    the steps launch (for inspection: tests, ``info``, profiles); details: backend facts
    (e.g. flash's tile and split count).
    """

    backend: str
    reason: str
    problem: object
    device: int | None
    options: PlanOptions
    steps: tuple
    launches: tuple = ()
    details: dict = field(default_factory=dict, compare=False)
    gpu: bool = True
    sizes: dict = field(default=None, compare=False)  # GPU: _buffers.buffer_sizes(problem)

    def run(self, arrays, out):
        """Run the call: ``arrays`` by argument name (CuPy on the plan's device, or NumPy for
        the reference), ``out`` the (T, N*H) output it fills; the caches are written in place.
        Asynchronous on the current stream for GPU plans, which first read every argument's
        address once and check the buffers with them (``_buffers.check_device_buffers``:
        no written array overlaps another argument, 16-byte alignment) before any launch; a
        call made while the stream captures a CUDA graph keeps its scratch memory alive
        (``_capture``)."""
        if not self.gpu:
            call = Call(arrays, out)
            for step in self.steps:
                step(call)
            return out
        import cupy

        ptr = {name: 0 if x is None else x.data.ptr for name, x in arrays.items()}
        ptr["out"] = out.data.ptr
        _buffers.check_device_buffers(ptr, self.sizes, arrays)
        stream = cupy.cuda.get_current_stream()
        call = Call(arrays, out, stream.ptr, ptr)
        with _capture.keep_allocations(cupy, stream):
            for step in self.steps:
                step(call)
        return out
