"""Every boundary check of ``paged_attention``, with messages that say what to fix.

``check_arguments`` looks at shapes, dtypes, ranks, contiguity and attribute values (host-known
facts, no device access) and returns the ``Problem`` every later stage reads.
``check_metadata`` looks at the values of the metadata arrays (NumPy copies of them).
The memory itself (writable, no aliasing, alignment) is ``_buffers``' business. All of them run
before anything is written. Dtype, flag and array-kind faults raise TypeError; everything else
ValueError.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _checks, _layout, _optional, _quant
from ._checks import FLOAT_DTYPES


@dataclass(frozen=True)
class Problem:
    """Host-known description of one call: sizes, dtype and options (all Python scalars)."""

    num_tokens: int           # T
    batch: int                # B
    num_heads: int            # N
    kv_num_heads: int         # Nkv
    head_size: int            # H
    block_size: int
    num_blocks: int
    max_blocks: int           # block_table.shape[1]
    packed: bool
    dtype: str                # "float16", "bfloat16", ...
    scale: float              # resolved: 1/sqrt(H) when the caller passed 0
    softcap: float            # <= 0: off
    window: int               # local_window_size; <= 0: off
    do_rotary: bool
    rotary_interleaved: bool
    rotary_dim: int           # R (0 without cos/sin)
    cos_rows: int             # max_pos (0 without cos/sin)
    # Caller's host-side bounds (None: unknown); they size grids and scratch without a sync.
    max_seqlen_q: int | None = None     # >= every q_len
    max_seqlen_k: int | None = None     # >= every past + q_len
    total_kv_tokens: int | None = None  # >= sum of past + q_len
    # Optional inputs beyond opset 1 (cupy_paged/_optional.py); the defaults are their absence.
    head_sink: bool = False             # a (N,) head_sink array is given
    slot_mapping: bool = False          # a (T,) slot_mapping array is given
    qk_norm: bool = False               # q_norm_weight and k_norm_weight (H,) are given
    qk_norm_epsilon: float = 1e-6
    rotary_offset: int = 0              # first rotated channel
    k_cache_dtype: str = ""             # "int8" / "float8_e4m3fn" with k_scale; "": dtype
    v_cache_dtype: str = ""             # the same for value_cache with v_scale
    non_causal: bool = False            # is_causal=False: new tokens see each other both ways
    kv_cache_layout: str = "standard"   # "latent": one latent head cached, V its leading channels
    v_head_size: int = 0                # latent: Hv, V's channels per head; 0: head_size

    @property
    def latent(self):
        """The latent (MLA) layout: no value cache, V = key_cache[..., :v_head_size]."""
        return self.kv_cache_layout == "latent"

    @property
    def value_head_size(self):
        """Hv: the channels of V per head, and of the output per query head."""
        return self.v_head_size or self.head_size

    @property
    def quantized_cache(self):
        """Either cache is one-byte (k_scale / v_scale given)."""
        return bool(self.k_cache_dtype or self.v_cache_dtype)

    @property
    def negative_scale(self):
        """A scale < 0 (ONNX Runtime has no sign check)."""
        return self.scale < 0

    @property
    def group(self):
        """G = N / Nkv query heads per kv head."""
        return self.num_heads // self.kv_num_heads


# Problems of argument signatures that passed the static checks. The checks read only the
# arrays' kind, shape, strides and dtype and the scalars (with their types, so True never
# stands in for 1), so an equal signature passes them again: a decode loop pays for them once.
_PASSED: dict = {}
_PASSED_MAX = 1024


def check_arguments(a, **attributes):
    """Static checks of every argument; returns the call's ``Problem``.

    a: mapping of argument name -> NumPy/CuPy array or None (query, key, value, key_cache,
    value_cache, cumulative_sequence_length, past_seqlens, block_table, cos_cache, sin_cache,
    out and the optional arrays). attributes: num_heads, kv_num_heads, scale, softcap,
    local_window_size, do_rotary, rotary_interleaved and the optional max_seqlen_q,
    max_seqlen_k, total_kv_tokens, is_causal, kv_cache_layout, v_head_size and
    ``_optional.ATTRIBUTES``.
    A signature that passed before returns its cached ``Problem``.
    """
    try:
        key = (tuple(a), tuple([None if x is None else (type(x), x.shape, x.strides, x.dtype)
                                for x in a.values()]),
               tuple(attributes.items()), tuple(map(type, attributes.values())))
        problem = _PASSED.get(key)
    except (TypeError, AttributeError):    # unhashable or not an array: the checks say why
        key = problem = None
    if problem is None:
        problem = _check_arguments(a, **attributes)
        if key is not None:
            if len(_PASSED) >= _PASSED_MAX:
                _PASSED.clear()
            _PASSED[key] = problem
    return problem


def _check_arguments(a, *, num_heads, kv_num_heads, scale, softcap, local_window_size,
                     do_rotary, rotary_interleaved, max_seqlen_q=None, max_seqlen_k=None,
                     total_kv_tokens=None, is_causal=True, kv_cache_layout="standard",
                     v_head_size=None, **optional):
    latent = _layout.layout_name(kv_cache_layout) == "latent"
    num_heads = _positive_int("num_heads", num_heads)
    kv_num_heads = _positive_int("kv_num_heads", kv_num_heads)
    if latent:
        _layout.check_latent(a, kv_num_heads)
    if num_heads % kv_num_heads:
        raise ValueError(f"num_heads: must be a multiple of kv_num_heads ({kv_num_heads}), "
                         f"got {num_heads}")
    scale = _finite("scale", scale)                  # 0: 1/sqrt(H); any other finite value, as ORT
    softcap = _finite("softcap", softcap)            # <= 0: off, as in ORT
    window = _integer("local_window_size", local_window_size)  # <= 0: off, as in ORT
    do_rotary = _flag("do_rotary", do_rotary)
    rotary_interleaved = _flag("rotary_interleaved", rotary_interleaved)
    is_causal = _flag("is_causal", is_causal)
    if not is_causal and window > 0:
        raise ValueError(f"local_window_size: {window} with is_causal=False is not defined here "
                         "(ONNX Runtime's two-sided window is not implemented); pass "
                         "local_window_size=-1 or is_causal=True")

    for name, array in a.items():
        if array is not None and not array.flags.c_contiguous:
            raise ValueError(f"{name}: must be C-contiguous, got strides {array.strides} for "
                             f"shape {array.shape}; pass xp.ascontiguousarray({name})")

    key_cache, value_cache = a["key_cache"], a["value_cache"]
    dtype = _float_dtype("query", a["query"])
    _given("key_cache", key_cache)
    _rank("key_cache", key_cache, 4, "(num_blocks, block_size, kv_num_heads, head_size)")
    num_blocks, block_size, cache_heads, head_size = (int(d) for d in key_cache.shape)
    if cache_heads != kv_num_heads:
        raise ValueError(f"key_cache: expected shape[2] == kv_num_heads ({kv_num_heads}), "
                         f"got shape {tuple(key_cache.shape)}")
    k_quant = _quant.cache_dtype("key_cache", key_cache, a.get("k_scale"), dtype,
                                 kv_num_heads, head_size)
    v_quant = ""
    if not latent:                # latent: value_cache is None (checked above)
        _given("value_cache", value_cache)
        if tuple(value_cache.shape) != tuple(key_cache.shape):
            raise ValueError(f"value_cache: expected the shape of key_cache "
                             f"{tuple(key_cache.shape)}, got {tuple(value_cache.shape)}")
        v_quant = _quant.cache_dtype("value_cache", value_cache, a.get("v_scale"), dtype,
                                     kv_num_heads, head_size)
    if head_size % 8 or head_size == 0:
        raise ValueError(f"key_cache: head_size (shape[3]) must be a positive multiple of 8, "
                         f"got {head_size}")
    v_head = _layout.v_head_size(v_head_size, head_size, latent)
    _layout.check_scale(scale, v_head, head_size)
    if block_size < 1:
        raise ValueError(f"key_cache: block_size (shape[1]) must be >= 1, got {block_size}")

    num_tokens, packed = _check_qkv(a, dtype, num_heads, kv_num_heads, head_size, latent)
    batch = _check_metadata_shapes(a)
    rotary_dim, cos_rows = _check_rotary(a, dtype, head_size, do_rotary)
    optional = _optional.check(a, dtype=dtype, num_tokens=num_tokens, num_heads=num_heads,
                               head_size=head_size, rotary_dim=rotary_dim, do_rotary=do_rotary,
                               **optional)
    out = a.get("out")
    if out is not None:
        _dtype_is("out", out, dtype)
        width = num_heads * (v_head or head_size)
        if tuple(out.shape) != (num_tokens, width):
            per_head = "v_head_size" if v_head else "head_size"
            raise ValueError(f"out: expected shape {(num_tokens, width)} = (T, num_heads * "
                             f"{per_head}), got {tuple(out.shape)}")

    return Problem(
        num_tokens=num_tokens, batch=batch, num_heads=num_heads, kv_num_heads=kv_num_heads,
        head_size=head_size, block_size=block_size, num_blocks=num_blocks,
        max_blocks=int(a["block_table"].shape[1]), packed=packed, dtype=dtype,
        scale=scale if scale != 0 else 1.0 / math.sqrt(head_size), softcap=softcap,
        window=window, do_rotary=do_rotary, rotary_interleaved=rotary_interleaved,
        rotary_dim=rotary_dim, cos_rows=cos_rows,
        max_seqlen_q=_optional_bound("max_seqlen_q", max_seqlen_q),
        max_seqlen_k=_optional_bound("max_seqlen_k", max_seqlen_k),
        total_kv_tokens=_optional_bound("total_kv_tokens", total_kv_tokens),
        k_cache_dtype=k_quant, v_cache_dtype=v_quant, non_causal=not is_causal,
        kv_cache_layout="latent" if latent else "standard", v_head_size=v_head, **optional)


def check_metadata(problem, cum, past, block_table, slot_mapping=None):
    """Data checks of the metadata values (host NumPy arrays; slot_mapping too when the call
    has one); raises ValueError naming the argument and the first offending sequence."""
    if slot_mapping is not None:
        _optional.check_slots(problem, slot_mapping)
    cum = np.asarray(cum, dtype=np.int64)
    past = np.asarray(past, dtype=np.int64)
    table = np.asarray(block_table, dtype=np.int64)
    name = "cumulative_sequence_length"
    if cum[0] != 0:
        raise ValueError(f"{name}[0]: must be 0, got {cum[0]}")
    if cum[-1] != problem.num_tokens:
        raise ValueError(f"{name}[{problem.batch}]: must equal the number of query rows T = "
                         f"{problem.num_tokens}, got {cum[-1]}")
    drops = np.flatnonzero(np.diff(cum) < 0)
    if drops.size:
        b = int(drops[0])
        raise ValueError(f"{name}: must be non-decreasing, got {name}[{b}] = {cum[b]} > "
                         f"{name}[{b + 1}] = {cum[b + 1]}")
    negative = np.flatnonzero(past < 0)
    if negative.size:
        b = int(negative[0])
        raise ValueError(f"past_seqlens[{b}] = {past[b]}: must be >= 0")
    bad = np.argwhere((table < -1) | (table >= problem.num_blocks))
    if bad.size:
        b, col = (int(i) for i in bad[0])
        raise ValueError(f"block_table[{b}, {col}] = {table[b, col]}: block ids must lie in "
                         f"[-1, num_blocks = {problem.num_blocks})")
    q_lens = np.diff(cum)
    ends = past + q_lens
    capacity = problem.max_blocks * problem.block_size
    over = np.flatnonzero((q_lens > 0) & (ends > capacity))
    if over.size:
        b = int(over[0])
        raise ValueError(
            f"block_table: sequence {b} needs positions up to past_seqlens[{b}] + q_len = "
            f"{past[b]} + {q_lens[b]} = {ends[b]}, more than the table's capacity "
            f"max_blocks * block_size = {problem.max_blocks} * {problem.block_size} = {capacity}")
    _check_hints(problem, q_lens, ends)
    if problem.do_rotary:
        beyond = np.flatnonzero((q_lens > 0) & (ends > problem.cos_rows))
        if beyond.size:
            b = int(beyond[0])
            raise ValueError(
                f"cos_cache: sequence {b} reaches position {ends[b] - 1} (past_seqlens[{b}] = "
                f"{past[b]}, q_len {q_lens[b]}) but cos_cache has only {problem.cos_rows} rows")


def _check_hints(problem, q_lens, kv_lens):
    """The caller's bounds must hold: kernels size grids and scratch from them."""
    for name, hint, actual in (
            ("max_seqlen_q", problem.max_seqlen_q, int(q_lens.max(initial=0))),
            ("max_seqlen_k", problem.max_seqlen_k, int(kv_lens.max(initial=0))),
            ("total_kv_tokens", problem.total_kv_tokens, int(kv_lens.sum()))):
        if hint is not None and actual > hint:
            raise ValueError(f"{name}: the metadata needs {actual}, more than the bound "
                             f"{hint} given")


def _check_qkv(a, dtype, num_heads, kv_num_heads, head_size, latent=False):
    """Returns (T, packed) after checking query, key and value against the cache (latent:
    value is None, ``_layout.check_latent`` made sure)."""
    query, key, value = a["query"], a["key"], a["value"]
    _rank("query", query, 2, "(T, num_heads * head_size)")
    num_tokens, width = (int(d) for d in query.shape)
    if (key is None) != (value is None) and not latent:
        given, missing = ("key", "value") if value is None else ("value", "key")
        raise ValueError(f"{missing}: is None but {given} is given; pass both, or neither "
                         "with a packed query")
    if key is None:
        per_token = num_heads + 2 * kv_num_heads
        if width != per_token * head_size:
            why = ("" if width % per_token == 0 else
                   f" ({width} is not a multiple of num_heads + 2 * kv_num_heads = {per_token})")
            raise ValueError(
                f"query: packed QKV (key and value None) expects shape "
                f"{(num_tokens, per_token * head_size)} = (T, (num_heads + 2 * kv_num_heads) * "
                f"head_size), got {tuple(query.shape)}{why}")
        return num_tokens, True
    if width != num_heads * head_size:
        raise ValueError(f"query: expected shape {(num_tokens, num_heads * head_size)} = "
                         f"(T, num_heads * head_size), got {tuple(query.shape)}")
    for name, array in (("key", key), ("value", value)):
        if array is None:         # the latent layout's value (checked by _layout)
            continue
        _rank(name, array, 2, "(T, kv_num_heads * head_size)")
        _dtype_is(name, array, dtype)
        if tuple(array.shape) != (num_tokens, kv_num_heads * head_size):
            raise ValueError(f"{name}: expected shape {(num_tokens, kv_num_heads * head_size)} "
                             f"= (T, kv_num_heads * head_size), got {tuple(array.shape)}")
    return num_tokens, False


def _check_metadata_shapes(a):
    """Returns B after checking the three int32 metadata arrays' ranks and lengths."""
    cum, past, table = a["cumulative_sequence_length"], a["past_seqlens"], a["block_table"]
    for name, array, rank in (("cumulative_sequence_length", cum, 1),
                              ("past_seqlens", past, 1), ("block_table", table, 2)):
        if array is None:
            raise TypeError(f"{name}: expected an int32 array, got None")
        _rank(name, array, rank, "(B + 1,)" if rank == 1 and name[0] == "c" else
              "(B,)" if rank == 1 else "(B, max_blocks_per_seq)")
        if str(array.dtype) != "int32":
            raise TypeError(f"{name}: expected dtype int32, got {array.dtype}"
                            + ("; cast with .astype('int32')" if array.dtype.kind in "iu" else ""))
    if cum.shape[0] < 1:
        raise ValueError("cumulative_sequence_length: expected shape (B + 1,) with B >= 0, "
                         f"got {tuple(cum.shape)}")
    batch = int(cum.shape[0]) - 1
    if past.shape[0] != batch:
        raise ValueError(f"past_seqlens: expected shape ({batch},) (one entry per sequence, "
                         f"B = len(cumulative_sequence_length) - 1 = {batch}), "
                         f"got {tuple(past.shape)}")
    if table.shape[0] != batch:
        raise ValueError(f"block_table: expected {batch} rows (one per sequence), "
                         f"got shape {tuple(table.shape)}")
    return batch


def _check_rotary(a, dtype, head_size, do_rotary):
    """Returns (R, max_pos) of cos/sin, or (0, 0) without them."""
    cos, sin = a["cos_cache"], a["sin_cache"]
    if (cos is None) != (sin is None):
        given, missing = ("cos_cache", "sin_cache") if sin is None else ("sin_cache", "cos_cache")
        raise ValueError(f"{missing}: is None but {given} is given; pass both or neither")
    if cos is None:
        if do_rotary:
            raise ValueError("cos_cache: do_rotary=True needs cos_cache and sin_cache "
                             "(see cupy_paged.rotary_cache), got None")
        return 0, 0
    _rank("cos_cache", cos, 2, "(max_pos, rotary_dim / 2)")
    _dtype_is("cos_cache", cos, dtype)
    _same("sin_cache", sin, cos, "cos_cache")
    rows, half = (int(d) for d in cos.shape)
    if half < 1 or 2 * half > head_size:
        raise ValueError(f"cos_cache: rotary_dim = 2 * shape[1] must lie in [2, head_size = "
                         f"{head_size}], got shape {tuple(cos.shape)}")
    return 2 * half, rows


def _given(name, array):
    if array is None:
        raise TypeError(f"{name}: expected an array (num_blocks, block_size, kv_num_heads, "
                        "head_size), got None" + (" (value_cache may be None only with "
                                                  "kv_cache_layout='latent')"
                                                  if name == "value_cache" else ""))


# the shared checks under the names this module's code uses
_rank = _checks.rank
_float_dtype = _checks.float_dtype
_dtype_is = _checks.dtype_is
_same = _checks.same
_optional_bound = _checks.optional_bound
_positive_int = _checks.positive_int
_integer = _checks.integer
_flag = _checks.flag
_finite = _checks.finite
