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
