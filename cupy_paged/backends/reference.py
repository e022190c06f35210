"""The NumPy reference as a backend: NumPy input directly, CuPy input through host copies.

On CuPy input it synchronises and copies every array to the host and the caches back: it is
the oracle GPU tests compare against, never a fast path, and "auto" never picks it for GPU
arrays.
"""
from __future__ import annotations

import numpy as np

from ..reference import paged_attention_reference
from .base import Backend, Capabilities
from .plan import Plan


class _ReferenceStep:
    """The whole call on the host (copies of CuPy arrays there and the caches back)."""

    def __init__(self, problem):
        self.problem = problem

    def __call__(self, call):
        problem, a, out = self.problem, call.a, call.out
        host = {name: (None if x is None else _to_host(x)) for name, x in a.items()}
        compute = np.float64 if problem.dtype == "float64" else np.float32
        result = paged_attention_reference(
            host["query"], host["key"], host["value"], host["key_cache"], host["value_cache"],
            host["cumulative_sequence_length"], host["past_seqlens"], host["block_table"],
            host["cos_cache"], host["sin_cache"],
            num_heads=problem.num_heads, kv_num_heads=problem.kv_num_heads,
            scale=problem.scale, softcap=problem.softcap, local_window_size=problem.window,
            do_rotary=problem.do_rotary, rotary_interleaved=problem.rotary_interleaved,
            compute_dtype=compute, head_sink=host.get("head_sink"),
            slot_mapping=host.get("slot_mapping"), q_norm_weight=host.get("q_norm_weight"),
            k_norm_weight=host.get("k_norm_weight"), qk_norm_epsilon=problem.qk_norm_epsilon,
            rotary_offset=problem.rotary_offset, k_scale=host.get("k_scale"),
            v_scale=host.get("v_scale"), is_causal=not problem.non_causal,
            kv_cache_layout=problem.kv_cache_layout, v_head_size=problem.v_head_size or None)
        if isinstance(out, np.ndarray):
            out[...] = result
            return
        import cupy

        a["key_cache"].set(host["key_cache"])
        if a["value_cache"] is not None:            # None in the latent layout
            a["value_cache"].set(host["value_cache"])
        out[...] = cupy.asarray(result)


def _to_host(x):
    return x if isinstance(x, np.ndarray) else x.get()


def make_plan(problem, device, sm, options, reason):
    """One host step; takes no options."""
    options.check("reference", ())
    return Plan("reference", reason, problem, device, options, (_ReferenceStep(problem),),
                gpu=False)


BACKEND = Backend(
    name="reference",
    capabilities=Capabilities(
        array_kinds=frozenset({"numpy", "cupy"}),
        dtype_min_sm={"float16": 0, "bfloat16": 0, "float32": 0, "float64": 0}),
    make_plan=make_plan)
