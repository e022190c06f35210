"""cupy_paged: paged-KV-cache attention (ONNX Runtime PagedAttention semantics) for CuPy and NumPy.

    import cupy_paged as cpg
    out = cpg.paged_attention(q, k, v, key_cache, value_cache, cum, past, block_table,
                              num_heads=32, kv_num_heads=8)
"""
from ._precompile import precompile
from .api import AttentionPlan, check_errors, paged_attention, plan
from .backends._flash_tiles import Tile
from .backends.plan import PlanOptions
from .cache import CacheFullError, PagedKVCache, StepMetadata
from .errors import CompileError, MetadataError, ToolchainError, UnsupportedError
from .reference import paged_attention_reference
from .rotary import rotary_cache

__version__ = "0.1.0"

__all__ = [
    "AttentionPlan",
    "CacheFullError",
    "CompileError",
    "MetadataError",
    "PagedKVCache",
    "PlanOptions",
    "StepMetadata",
    "Tile",
    "ToolchainError",
    "UnsupportedError",
    "__version__",
    "check_errors",
    "paged_attention",
    "paged_attention_reference",
    "plan",
    "precompile",
    "rotary_cache",
]
