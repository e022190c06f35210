"""Exceptions raised by cupy_paged.

Bad arguments raise the built-in ``ValueError`` (shape, rank, value, contiguity) or
``TypeError`` (dtype, array kind); the classes here cover what is not the caller's typo.
"""


class UnsupportedError(RuntimeError):
    """No backend can run this call; the message gives each backend's reason."""


class ToolchainError(RuntimeError):
    """NVRTC or a header set it needs (CUDA, CCCL, CUTLASS) could not be found."""


class CompileError(RuntimeError):
    """NVRTC rejected a kernel variant; the message holds the variant name and the NVRTC log."""


class MetadataError(ValueError):
    """The GPU metadata guard stopped sequences whose metadata values would have sent a kernel
    outside its arrays (raised by ``check_errors`` and by ``validate=True`` calls).

    Attributes: ``device`` (GPU id), ``fault`` (the first fault's name, e.g. "past_seqlens"),
    ``sequence`` (its sequence index; for a batch-wide fault the index the message names),
    ``values`` (the offending values the guard recorded), ``whole_batch`` (every sequence of
    that call was stopped), ``sequences`` and ``calls`` (stopped sequences and faulting calls
    since the last check), ``seen`` (every fault name seen since the last check).
    """

    def __init__(self, message, *, device=None, fault=None, sequence=None, values=(),
                 whole_batch=False, sequences=0, calls=0, seen=()):
        super().__init__(message)
        self.device = device
        self.fault = fault
        self.sequence = sequence
        self.values = tuple(values)
        self.whole_batch = whole_batch
        self.sequences = sequences
        self.calls = calls
        self.seen = tuple(seen)
