"""The optional inputs beyond ONNX Runtime's opset-1 PagedAttention (docs/semantics.md,
"Optional inputs"): their names, their defaults, and their checks.

Arrays: ``head_sink`` (N,), ``slot_mapping`` (T,) int32, ``q_norm_weight`` and
``k_norm_weight`` (H,), ``k_scale`` and ``v_scale`` (one-byte caches: ``_quant.py``, checked
with the caches). Attributes: ``qk_norm_epsilon`` (finite > 0) and ``rotary_offset``
(a multiple of 8). Each absent or at its default means today's behaviour, bit for bit.
"""
from __future__ import annotations

import numpy as np

from . import _checks

ARRAYS = ("head_sink", "slot_mapping", "q_norm_weight", "k_norm_weight", "k_scale", "v_scale")
ATTRIBUTES = {"qk_norm_epsilon": 1e-6, "rotary_offset": 0}


def check(a, *, dtype, num_tokens, num_heads, head_size, rotary_dim, do_rotary,
          qk_norm_epsilon=1e-6, rotary_offset=0):
    """Static checks (shapes, dtypes, attribute values) of the optional inputs; returns the
    ``Problem`` fields they set: head_sink, slot_mapping, qk_norm (bools), qk_norm_epsilon,
    rotary_offset. a: the call's arrays by name (absent names count as None)."""
    sink = a.get("head_sink")
    if sink is not None:
        _checks.dtype_is("head_sink", sink, dtype)
        _shape("head_sink", sink, (num_heads,), "(num_heads,)")
    slots = a.get("slot_mapping")
    if slots is not None:
        if str(slots.dtype) != "int32":
            raise TypeError(f"slot_mapping: expected dtype int32, got {slots.dtype}")
        _shape("slot_mapping", slots, (num_tokens,), "(T,), one slot per new token")
    q_norm, k_norm = a.get("q_norm_weight"), a.get("k_norm_weight")
    if (q_norm is None) != (k_norm is None):
        given, missing = (("q_norm_weight", "k_norm_weight") if k_norm is None
                          else ("k_norm_weight", "q_norm_weight"))
        raise ValueError(f"{missing}: is None but {given} is given; pass both or neither")
    for name, w in (("q_norm_weight", q_norm), ("k_norm_weight", k_norm)):
        if w is not None:
            _checks.dtype_is(name, w, dtype)
            _shape(name, w, (head_size,), "(head_size,)")
    epsilon = _checks.finite("qk_norm_epsilon", qk_norm_epsilon)
    if epsilon <= 0:
        raise ValueError(f"qk_norm_epsilon: expected a finite number > 0, got {epsilon}")
    offset = _checks.integer("rotary_offset", rotary_offset)
    if offset:
        if offset < 0 or offset % 8:
            raise ValueError(f"rotary_offset: expected a multiple of 8 >= 0, got {offset}")
        if not do_rotary:
            raise ValueError(f"rotary_offset: {offset} moves the rotated channels, but "
                             "do_rotary is False; pass rotary_offset=0 or do_rotary=True")
        if offset + rotary_dim > head_size:
            raise ValueError(f"rotary_offset: channels [{offset}, {offset} + rotary_dim = "
                             f"{offset + rotary_dim}) reach past head_size = {head_size}")
    return dict(head_sink=sink is not None, slot_mapping=slots is not None,
                qk_norm=q_norm is not None, qk_norm_epsilon=epsilon, rotary_offset=offset)


def check_slots(problem, slots):
    """Data check of slot_mapping's values (a host NumPy array): each is -1 (do not store)
    or a slot of the caches, in [0, num_blocks * block_size). ValueError naming the first
    offending token."""
    capacity = problem.num_blocks * problem.block_size
    slots = np.asarray(slots, dtype=np.int64)
    bad = np.flatnonzero((slots < -1) | (slots >= capacity))
    if bad.size:
        t = int(bad[0])
        raise ValueError(f"slot_mapping[{t}] = {slots[t]}: slots must lie in [-1, num_blocks * "
                         f"block_size = {problem.num_blocks} * {problem.block_size} = "
                         f"{capacity})")


def _shape(name, array, shape, layout):
    if tuple(array.shape) != shape:
        raise ValueError(f"{name}: expected shape {layout} = {shape}, got {tuple(array.shape)}")
