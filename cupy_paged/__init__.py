"""cupy_paged: paged-KV-cache attention (ONNX Runtime PagedAttention semantics) for CuPy and NumPy.

    import cupy_paged as cpg
    out = cpg.paged_attention(q, k, v, key_cache, value_cache, cum, past, block_table,
                              num_heads=32, kv_num_heads=8)
"""
from .api import check_errors, paged_attention
from .cache import CacheFullError, PagedKVCache, StepMetadata
from ._precompile import precompile
from .errors import CompileError, MetadataError, ToolchainError, UnsupportedError
from .reference import paged_attention_reference
from .rotary import rotary_cache

__version__ = "0.1.0"

__all__ = [
    "paged_attention",
    "check_errors",
    "paged_attention_reference",
    "rotary_cache",
    "PagedKVCache",
    "StepMetadata",
    "CacheFullError",
    "precompile",
    "UnsupportedError",
    "ToolchainError",
    "CompileError",
    "MetadataError",
    "__version__",
]
