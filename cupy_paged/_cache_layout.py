"""The ``layout`` and ``v_head_size`` arguments of ``PagedKVCache`` (docs/semantics.md,
"Latent (MLA) layout").

"standard": a key cache and a value cache, (num_blocks, block_size, Nkv, H) each.
"latent": one cache, (num_blocks, block_size, 1, H), of one latent head per token; V is its
leading v_head_size channels, so the cache has no value cache and no v_scale.
"""

import operator

from cupy_paged._layout import LAYOUTS


def check(layout, kv_num_heads, head_size, v_head_size):
    """(layout, Hv) for a new cache: Hv = v_head_size in the latent layout (None: head_size),
    head_size in the standard one. ValueError (TypeError for a non-integer v_head_size)."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(map(repr, LAYOUTS))}, "
                         f"got {layout!r}")
    if v_head_size is not None:
        v_head_size = _integer(v_head_size)
    if layout == "standard":
        if v_head_size is not None and v_head_size != head_size:
            raise ValueError(f"v_head_size: the standard layout's V has head_size channels; "
                             f"expected None or head_size = {head_size}, got {v_head_size} "
                             "(a narrower V needs layout='latent')")
        return layout, head_size
    if kv_num_heads != 1:
        raise ValueError(f"kv_num_heads: layout='latent' caches one latent head per token, "
                         f"expected 1, got {kv_num_heads}")
    if v_head_size is None:
        return layout, head_size
    if v_head_size <= 0 or v_head_size % 8:
        raise ValueError(f"v_head_size: expected a positive multiple of 8, got {v_head_size}")
    if v_head_size > head_size:
        raise ValueError(f"v_head_size: V is the leading channels of the cached key, expected "
                         f"at most head_size = {head_size}, got {v_head_size}")
    return layout, v_head_size


def _integer(value):
    """v_head_size as a Python int; bools and floats are refused, not truncated."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"v_head_size must be an integer or None "
                        f"(got {type(value).__name__} {value!r})") from None
