"""``paged_attention``: validate -> plan (pick the backend, say why) -> run; ``plan`` makes the
plan of a call signature up front, for callers that want to inspect it or reuse it."""
from __future__ import annotations

import os

from . import _buffers, _optional, _quant, _validate, backends
from ._arrays import adopt_arrays
from .backends import _guard
from .backends.plan import DEFAULT_OPTIONS

check_errors = _guard.check_errors


def paged_attention(
    query, key, value, key_cache, value_cache,
    cumulative_sequence_length, past_seqlens, block_table,
    cos_cache=None, sin_cache=None, *,
    num_heads, kv_num_heads, scale=0.0, softcap=0.0, local_window_size=-1,
    do_rotary=False, rotary_interleaved=False,
    backend="auto", validate=False, out=None,
    max_seqlen_q=None, max_seqlen_k=None, total_kv_tokens=None, options=None,
    head_sink=None, slot_mapping=None, q_norm_weight=None, k_norm_weight=None,
    qk_norm_epsilon=1e-6, rotary_offset=0, k_scale=None, v_scale=None, is_causal=True,
    kv_cache_layout="standard", v_head_size=None,
):
    """Attention of new tokens over a paged KV cache (ONNX Runtime ``PagedAttention`` semantics).

    query: (T, N*H), or packed (T, (N+2*Nkv)*H) with key = value = None.
    key, value: (T, Nkv*H). key_cache, value_cache: (num_blocks, block_size, Nkv, H), updated
    in place with the new (rotated) keys and values; they and out must be writable and share
    no memory with any other argument.
    cumulative_sequence_length: int32 (B+1,); past_seqlens: int32 (B,);
    block_table: int32 (B, max_blocks_per_seq), -1 = unmapped.
    cos_cache, sin_cache: (max_pos, rotary_dim/2), used when do_rotary.
    dtypes: float16 / bfloat16 on the GPU; float16 / float32 / float64 on NumPy.
    scale: 0 means 1/sqrt(H); softcap > 0 caps logits as c*tanh(s/c); local_window_size > 0
    lets each query see that many keys ending at itself.
    Optional inputs beyond ONNX Runtime's opset 1 (docs/semantics.md, "Optional inputs"; which
    backend takes which: ``python -m cupy_paged info``):
    head_sink: (N,) in query's dtype, a sink logit per query head that joins each row's
    softmax denominator and contributes no value (flash and reference).
    slot_mapping: int32 (T,), the flat cache slot block * block_size + offset each new token's
    K/V is written to (-1: not stored); reads still go through block_table (reference).
    q_norm_weight, k_norm_weight: (H,) in query's dtype, both or neither: RMSNorm of every
    query and key head (epsilon qk_norm_epsilon, finite > 0) before rotary (reference).
    rotary_offset: a multiple of 8, the first rotated channel (reference).
    k_scale, v_scale: float32 (1,) per tensor or (Nkv, 1, H) per channel, the scales of an
    int8 / float8_e4m3fn key / value cache (each with its own; reference).
    is_causal=False: the new tokens of a sequence see each other both ways, every key
    0 .. past + q_len - 1 (no window; reference). A negative scale is taken as given, like
    ONNX Runtime (reference).
    kv_cache_layout="latent" (multi-head latent attention, reference): kv_num_heads = 1, key
    (T, H), key_cache (num_blocks, block_size, 1, H), value = value_cache = None (no packed
    query, no v_scale); V is the leading v_head_size channels of the cached (normed, rotated)
    key. v_head_size: None = H, else a multiple of 8 <= H (standard layout: None or H);
    v_head_size != H needs an explicit scale. The output is then (T, N*v_head_size).
    backend: "auto" | "flash" | "mea" | "reference". validate: also run the data-dependent
    checks on GPU input on the host before the launch, and after it wait for the GPU and raise
    the metadata guard's error (``check_errors``); NumPy input is always checked. Without it,
    a GPU call never syncs: the guard on the device stops every sequence whose metadata would
    reach outside an array (its output rows become NaN, it writes nothing to the caches) and
    ``cupy_paged.check_errors()`` reports it later.
    out: optional preallocated (T, N*H) output ((T, N*v_head_size) in the latent layout).
    max_seqlen_q, max_seqlen_k, total_kv_tokens: optional host-side upper bounds on the largest
    q_len, the largest past + q_len and the sum of past + q_len. GPU backends size their grids
    and scratch from them without a device->host sync; without them a backend that needs
    such a size syncs once (the flash backend never needs to). Checked when validating.
    options: a ``cupy_paged.PlanOptions`` overriding the backend's heuristics (tile, split
    count, programmatic launches, mea's arch tag).
    Returns (T, N*H) (latent: (T, N*v_head_size)) in query's dtype, as the same kind of
    array as the input. The exact contract: ``docs/semantics.md``.
    """
    requested = backends.check_backend_name(backend)
    adopted = _adopt(query, key, value, key_cache, value_cache, cumulative_sequence_length,
                     past_seqlens, block_table, cos_cache, sin_cache, out,
                     head_sink=head_sink, slot_mapping=slot_mapping,
                     q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight,
                     k_scale=k_scale, v_scale=v_scale)
    problem = _validate.check_arguments(
        adopted.arrays, num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale,
        softcap=softcap, local_window_size=local_window_size, do_rotary=do_rotary,
        rotary_interleaved=rotary_interleaved, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, total_kv_tokens=total_kv_tokens,
        qk_norm_epsilon=qk_norm_epsilon, rotary_offset=rotary_offset, is_causal=is_causal,
        kv_cache_layout=kv_cache_layout, v_head_size=v_head_size)
    plan_ = backends.plan_for(requested, problem, adopted.kind, adopted.device, adopted.sm,
                              DEFAULT_OPTIONS if options is None else options)
    return _run(plan_, adopted, out, validate)


def plan(query, key, value, key_cache, value_cache, cumulative_sequence_length, past_seqlens,
         block_table, cos_cache=None, sin_cache=None, *, backend="auto", options=None,
         **attributes):
    """The plan of a ``paged_attention`` call signature, made now: ``AttentionPlan``.

    Takes ``paged_attention``'s arguments (only the arrays' kind, device, shapes, strides and
    dtypes are read: any arrays of the batch shape will do) and returns an object that runs
    calls of that signature, ``plan(query, ..., out=None, validate=False)``, and tells what
    they do: ``backend``, ``reason``, ``launches`` (kernel, grid, block, shared memory,
    programmatic), ``details``. A server or a CUDA-graph user builds the plan of its batch
    shape once; ``paged_attention`` makes and caches the same plan itself.
    """
    requested = backends.check_backend_name(backend)
    adopted = _adopt(query, key, value, key_cache, value_cache, cumulative_sequence_length,
                     past_seqlens, block_table, cos_cache, sin_cache,
                     attributes.pop("out", None),
                     **{name: attributes.pop(name, None) for name in _optional.ARRAYS})
    attributes = _attributes(**attributes)
    problem = _validate.check_arguments(adopted.arrays, **attributes)
    options = DEFAULT_OPTIONS if options is None else options
    made = backends.plan_for(requested, problem, adopted.kind, adopted.device, adopted.sm,
                             options)
    return AttentionPlan(made, requested, attributes, options)


def _attributes(*, num_heads, kv_num_heads, scale=0.0, softcap=0.0, local_window_size=-1,
                do_rotary=False, rotary_interleaved=False, max_seqlen_q=None,
                max_seqlen_k=None, total_kv_tokens=None, qk_norm_epsilon=1e-6,
                rotary_offset=0, is_causal=True, kv_cache_layout="standard",
                v_head_size=None):
    return dict(num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, softcap=softcap,
                local_window_size=local_window_size, do_rotary=do_rotary,
                rotary_interleaved=rotary_interleaved, max_seqlen_q=max_seqlen_q,
                max_seqlen_k=max_seqlen_k, total_kv_tokens=total_kv_tokens,
                qk_norm_epsilon=qk_norm_epsilon, rotary_offset=rotary_offset,
                is_causal=is_causal, kv_cache_layout=kv_cache_layout, v_head_size=v_head_size)


class AttentionPlan:
    """A planned ``paged_attention`` signature (see ``cupy_paged.plan``).

    Calling it with arrays of the planned kind, device, shapes, strides and dtypes runs the
    call (the same as ``paged_attention`` with the planned keyword arguments); other arrays
    raise ValueError. backend, reason, launches, details: the plan's facts.
    """

    def __init__(self, made, requested, attributes, options):
        self._plan, self._requested, self._attributes = made, requested, attributes
        self._options = options

    backend = property(lambda self: self._plan.backend)
    reason = property(lambda self: self._plan.reason)
    launches = property(lambda self: self._plan.launches)
    details = property(lambda self: dict(self._plan.details))

    def __call__(self, query, key, value, key_cache, value_cache, cumulative_sequence_length,
                 past_seqlens, block_table, cos_cache=None, sin_cache=None, *, out=None,
                 validate=False, **optional):
        """Run one call; returns (T, N*H) (latent: (T, N*v_head_size)) like
        ``paged_attention``. optional: the optional arrays (``_optional.ARRAYS``: head_sink,
        slot_mapping, q_norm_weight, k_norm_weight, k_scale, v_scale), each present exactly
        when it was in the planned call."""
        unknown = sorted(set(optional) - set(_optional.ARRAYS))
        if unknown:
            raise TypeError(f"{unknown[0]}: not an argument of a planned call (attributes "
                            "are fixed by cupy_paged.plan)")
        adopted = _adopt(query, key, value, key_cache, value_cache,
                         cumulative_sequence_length, past_seqlens, block_table, cos_cache,
                         sin_cache, out, **optional)
        problem = _validate.check_arguments(adopted.arrays, **self._attributes)
        made = self._plan
        if problem != made.problem or adopted.device != made.device:
            raise ValueError(
                "arrays: this plan runs calls of one signature; these arrays differ from it "
                f"(planned {made.problem} on device {made.device}, got {problem} on device "
                f"{adopted.device}); make another plan with cupy_paged.plan")
        return _run(made, adopted, out, validate)

    def __repr__(self):
        kernels = ", ".join(launch.kernel for launch in self.launches)
        return f"<AttentionPlan {self.backend}: {kernels or 'host'}>"


def _adopt(query, key, value, key_cache, value_cache, cum, past, block_table, cos_cache,
           sin_cache, out, **optional):
    """The call's arrays by argument name, adopted (``_arrays.adopt_arrays``); optional:
    the optional arrays by name (``_optional.ARRAYS``; absent ones are None)."""
    return adopt_arrays({
        "query": query, "key": key, "value": value, "key_cache": key_cache,
        "value_cache": value_cache, "cumulative_sequence_length": cum, "past_seqlens": past,
        "block_table": block_table, "cos_cache": cos_cache, "sin_cache": sin_cache,
        "out": out, **{name: optional.get(name) for name in _optional.ARRAYS}})


def _run(plan_, adopted, out, validate):
    """Run ``plan_`` on the adopted arrays: the checks of the buffers themselves (every call:
    writable, no aliasing, aligned for the GPU), the host checks where the plan has no guard
    (or validate asks), the output, the steps, and with validate the guard's error."""
    problem = plan_.problem
    if not plan_.gpu:  # a GPU plan checks them in Plan.run, with the addresses it launches with
        _buffers.check_buffers(adopted.arrays, adopted.kind)
    validate = validate or os.environ.get("CUPY_PAGED_VALIDATE") == "1"
    with adopted.context():      # the arrays' GPU; torch tensors: torch's current stream
        if not plan_.gpu or validate:
            _validate.check_metadata(problem, *_metadata_on_host(adopted))
            for name in ("k_scale", "v_scale") if problem.quantized_cache else ():
                scale = adopted.arrays[name]
                if scale is not None:
                    _quant.check_scale_values(name, scale if adopted.kind == "numpy"
                                              else scale.get())
        result = adopted.arrays["out"]
        if result is None:
            result = adopted.xp.empty(
                (problem.num_tokens, problem.num_heads * problem.value_head_size),
                dtype=adopted.arrays["query"].dtype)
        if problem.num_tokens:             # T = 0: nothing to write, caches untouched
            plan_.run(adopted.arrays, result)
            if plan_.gpu and validate:
                _guard.check_errors(adopted.device)
    return adopted.wrap(result, caller_out=out)


def _metadata_on_host(adopted):
    """(cum, past, block_table, slot_mapping or None) as NumPy arrays, with one
    device->host copy on the GPU."""
    a = adopted.arrays
    cum, past, table = (a["cumulative_sequence_length"], a["past_seqlens"], a["block_table"])
    slots = a.get("slot_mapping")
    if adopted.kind == "numpy":
        return cum, past, table, slots
    xp = adopted.xp
    parts = [cum, past, table.ravel()] + ([] if slots is None else [slots])
    flat = xp.concatenate(parts).get()
    n_cum, n_past, n_table = cum.shape[0], past.shape[0], table.size
    end = n_cum + n_past + n_table
    return (flat[:n_cum], flat[n_cum:n_cum + n_past],
            flat[n_cum + n_past:end].reshape(table.shape), None if slots is None else flat[end:])
