"""The ``layout`` and ``v_head_size`` arguments of ``PagedKVCache`` (docs/semantics.md,
"Latent (MLA) layout").

"standard": a key cache and a value cache, (num_blocks, block_size, Nkv, H) each.
"latent": one cache, (num_blocks, block_size, 1, H), of one latent head per token; V is its
leading v_head_size channels, so the cache has no value cache and no v_scale.
"""

import operator

from cupy_paged import _layout


def check(layout, kv_num_heads, head_size, v_head_size):
    """(layout, Hv) for a new cache: Hv = v_head_size in the latent layout (None: head_size),
    head_size in the standard one. ValueError (TypeError for a non-integer v_head_size); the
    rules are paged_attention's (``_layout``), named as the constructor's arguments."""
    layout = _layout.layout_name(layout, arg="layout")
    if v_head_size is not None:
        v_head_size = _integer(v_head_size)
    latent = layout == "latent"
    if latent and kv_num_heads != 1:
        raise ValueError(f"kv_num_heads: layout='latent' caches one latent head per token, "
                         f"expected 1, got {kv_num_heads}")
    return layout, _layout.v_head_size(v_head_size, head_size, latent, "layout") or head_size


def _integer(value):
    """v_head_size as a Python int; bools and floats are refused, not truncated."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"v_head_size must be an integer or None "
                        f"(got {type(value).__name__} {value!r})") from None
