"""The KV-cache layouts (docs/semantics.md, "Latent (MLA) layout") and the checks of the
arguments that differ between them.

"standard": a key cache and a value cache, (num_blocks, block_size, Nkv, H) each.
"latent" (multi-head latent attention, as DeepSeek-V2/V3 cache it): one cache of one latent
head per token, (num_blocks, block_size, 1, H); V is its leading v_head_size channels (Hv),
so ``value``, ``value_cache`` and ``v_scale`` are None and the output is (T, N*Hv).
"""
from __future__ import annotations

from . import _checks

LAYOUTS = ("standard", "latent")
_WHY_NONE = {"value": "V is the leading v_head_size channels of the cached key",
             "value_cache": "the latent layout has one cache, key_cache; V is read from it",
             "v_scale": "V is read from the key cache and dequantised with k_scale"}


def layout_name(kv_cache_layout, arg="kv_cache_layout"):
    """"standard" or "latent"; ValueError naming ``arg`` for anything else."""
    if not isinstance(kv_cache_layout, str) or kv_cache_layout not in LAYOUTS:
        raise ValueError(f"{arg}: expected one of {', '.join(map(repr, LAYOUTS))}, "
                         f"got {kv_cache_layout!r}")
    return kv_cache_layout


def check_latent(a, kv_num_heads):
    """The latent layout's arguments: one kv head; value, value_cache and v_scale None; no
    packed query (key given). a: the call's arrays by name."""
    if kv_num_heads != 1:
        raise ValueError(f"kv_num_heads: kv_cache_layout='latent' caches one latent head per "
                         f"token, expected 1, got {kv_num_heads}")
    for name, why in _WHY_NONE.items():
        x = a.get(name)
        if x is not None:
            raise ValueError(f"{name}: expected None with kv_cache_layout='latent' ({why}), "
                             f"got an array of shape {tuple(x.shape)}")
    if a.get("key") is None:
        raise ValueError("key, value: both None (a packed QKV query) with "
                         "kv_cache_layout='latent'; the latent layout takes no packed query: "
                         "pass key (T, head_size) and value=None, or kv_cache_layout='standard'")


def v_head_size(value, head_size, latent, layout_arg="kv_cache_layout"):
    """The Problem's v_head_size: latent: Hv (None: head_size), a positive multiple of 8 and
    at most head_size; standard: 0 (None, or head_size itself, is accepted: the standard
    layout's V always has head_size channels). layout_arg: the layout argument's name in the
    messages (``PagedKVCache`` calls it ``layout``)."""
    if value is None:
        return head_size if latent else 0
    value = _checks.integer("v_head_size", value)
    if not latent:
        if value != head_size:
            raise ValueError(f"v_head_size: the standard layout's V has head_size channels; "
                             f"expected None or head_size = {head_size}, got {value} (a "
                             f"narrower V needs {layout_arg}='latent')")
        return 0
    if value <= 0 or value % 8:
        raise ValueError(f"v_head_size: expected a positive multiple of 8, got {value}")
    if value > head_size:
        raise ValueError(f"v_head_size: V is the leading channels of the cached key, expected "
                         f"at most head_size = {head_size}, got {value}")
    return value


def check_scale(scale, v_head, head_size):
    """With Hv != H the caller names the softmax scale: 0 (the 1/sqrt(H) default) is refused."""
    if v_head and v_head != head_size and scale == 0:
        raise ValueError(f"scale: with v_head_size = {v_head} != head_size = {head_size} pass "
                         "the softmax scale explicitly (the model's, e.g. 1/sqrt of its query "
                         "head size), expected a finite number != 0, "
                         f"got {scale}")
