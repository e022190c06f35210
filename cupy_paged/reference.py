"""NumPy reference of ``paged_attention``: the oracle every GPU backend is tested against.

Readable first: one function per step of the contract, ``docs/semantics.md`` (unpack, rotary,
cache write, attention), vectorised per sequence, float32 or float64 arithmetic. It assumes its
input was already validated (``cupy_paged.paged_attention`` does that) and never imports CuPy.
A call that fails leaves the caches as they were; its arithmetic never raises.
"""
from __future__ import annotations

import math

import numpy as np

from . import _quant

__all__ = ["paged_attention_reference", "token_positions", "apply_rotary", "rms_norm"]

# Query rows attended at once; bounds the (N, rows, kv_len) score array of long prefills.
_QUERY_CHUNK = 256


def paged_attention_reference(
    query, key, value, key_cache, value_cache,
    cumulative_sequence_length, past_seqlens, block_table,
    cos_cache=None, sin_cache=None, *,
    num_heads, kv_num_heads, scale=0.0, softcap=0.0, local_window_size=-1,
    do_rotary=False, rotary_interleaved=False, compute_dtype=np.float32, head_sink=None,
    slot_mapping=None, q_norm_weight=None, k_norm_weight=None, qk_norm_epsilon=1e-6,
    rotary_offset=0, k_scale=None, v_scale=None, is_causal=True, kv_cache_layout="standard",
    v_head_size=None,
):
    """Paged attention on NumPy arrays, following ``docs/semantics.md``.

    query: (T, N*H), or packed (T, (N+2*Nkv)*H) with key = value = None.
    key, value: (T, Nkv*H). key_cache, value_cache: (num_blocks, block_size, Nkv, H), written
    in place with the new (rotated) keys and values, cast to the cache dtype.
    cumulative_sequence_length: int (B+1,); past_seqlens: int (B,); block_table: int (B, max_blocks).
    cos_cache, sin_cache: (max_pos, R/2). compute_dtype: float32 or float64 arithmetic.
    head_sink: None, or (N,): a sink logit per query head in every row's softmax denominator.
    slot_mapping: None, or int (T,): the flat slot block * block_size + offset each new token's
    K/V goes to (-1: not stored), instead of the one block_table gives; reads use block_table.
    q_norm_weight, k_norm_weight: None, or (H,) each: RMSNorm (epsilon qk_norm_epsilon) of every
    query and key head before rotary. rotary_offset: the first rotated channel.
    k_scale, v_scale: None, or float32 (1,) / (Nkv, 1, H) scales of an int8 or float8_e4m3fn
    key / value cache: new keys / values are quantised on write, cached ones dequantised on
    read (cupy_paged/_quant.py has the rule). is_causal=False: every new token of a sequence
    sees all of its keys 0 .. past + q_len - 1 (no window). scale: 0 means 1/sqrt(H); any
    other finite value (negative too) multiplies the logits.
    kv_cache_layout="latent": Nkv = 1, value = value_cache = v_scale = None; V is the leading
    v_head_size (None: H) channels of the cached key, read back (dequantised with k_scale)
    from key_cache, and the output is (T, N*v_head_size).
    Returns (T, N*H) in query's dtype. Input must already be valid (no checks here).
    Arithmetic follows IEEE like the GPU kernels (an overflow gives inf, whatever
    ``numpy.seterr`` says); an exception after the cache write (MemoryError,
    KeyboardInterrupt) restores the slots it wrote before it propagates.
    """
    cd = np.dtype(compute_dtype)
    num_tokens = query.shape[0]
    head_size = key_cache.shape[3]
    block_size = key_cache.shape[1]
    cum = np.asarray(cumulative_sequence_length, dtype=np.int64)
    past = np.asarray(past_seqlens, dtype=np.int64)
    table = np.asarray(block_table, dtype=np.int64)
    softmax_scale = scale if scale != 0 else 1.0 / math.sqrt(head_size)
    latent = kv_cache_layout == "latent"
    v_head = (v_head_size or head_size) if latent else head_size

    with np.errstate(all="ignore"):     # IEEE results, like the kernels
        q, k, v = _split_qkv(query, key, value, num_heads, kv_num_heads, head_size, cd)
        seq_of_token, pos = token_positions(cum, past)
        sink = None if head_sink is None else np.asarray(head_sink).astype(cd)
        if q_norm_weight is not None:
            q = rms_norm(q, np.asarray(q_norm_weight).astype(cd), qk_norm_epsilon)
            k = rms_norm(k, np.asarray(k_norm_weight).astype(cd), qk_norm_epsilon)
        if do_rotary:
            cos = np.asarray(cos_cache).astype(cd)[pos]
            sin = np.asarray(sin_cache).astype(cd)[pos]
            q = apply_rotary(q, cos, sin, rotary_interleaved, rotary_offset)
            k = apply_rotary(k, cos, sin, rotary_interleaved, rotary_offset)
        if slot_mapping is None:
            blocks = table[seq_of_token, pos // block_size]
            offsets = pos % block_size
        else:
            flat = np.asarray(slot_mapping, dtype=np.int64)
            blocks = np.where(flat >= 0, flat // block_size, -1)
            offsets = np.where(flat >= 0, flat % block_size, 0)
        mapped = blocks >= 0                                  # block -1: the token is not written
        slots = blocks[mapped], offsets[mapped]
        written = [(key_cache, _to_cache(k[mapped], key_cache, k_scale))]
        if not latent:                                        # latent: V lives in key_cache
            written.append((value_cache, _to_cache(v[mapped], value_cache, v_scale)))
        saved = [cache[slots] for cache, _ in written]        # copies (fancy indexing)
        try:
            for cache, new in written:
                cache[slots] = new
            out = _attend_sequences(q, key_cache, value_cache, cum, past, table, pos,
                                    softmax_scale, softcap, local_window_size,
                                    num_heads // kv_num_heads, cd, sink, (k_scale, v_scale),
                                    is_causal, v_head if latent else None)
            return out.reshape(num_tokens, num_heads * v_head).astype(query.dtype)
        except BaseException:
            # A slot two tokens write was saved once, before either write.
            for (cache, _), old in zip(written, saved):
                cache[slots] = old
            raise


def token_positions(cum, past):
    """(seq_of_token, position) for each of the T new tokens, both int64 (T,).

    Token t = cum[b] + j of sequence b sits at absolute position past[b] + j.
    """
    q_lens = np.diff(cum)
    seq_of_token = np.repeat(np.arange(len(q_lens)), q_lens)
    offset_in_seq = np.arange(int(cum[-1])) - cum[:-1][seq_of_token]
    return seq_of_token, past[seq_of_token] + offset_in_seq


def apply_rotary(x, cos, sin, interleaved, offset=0):
    """Rotate channels [offset, offset + R) of x (T, heads, H) by per-token cos/sin (T, R/2).

    Non-interleaved (GPT-NeoX) pairs channel i with i + R/2; interleaved (GPT-J) pairs 2i with
    2i + 1 (counted from offset). The other channels pass through unchanged. Returns a new
    array.
    """
    if offset:
        y = x.copy()
        y[..., offset:] = apply_rotary(x[..., offset:], cos, sin, interleaved)
        return y
    half = cos.shape[1]
    c, s = cos[:, None, :], sin[:, None, :]
    y = x.copy()
    if interleaved:
        even, odd = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        y[..., 0:2 * half:2] = even * c - odd * s
        y[..., 1:2 * half:2] = odd * c + even * s
    else:
        lo, hi = x[..., :half], x[..., half:2 * half]
        y[..., :half] = lo * c - hi * s
        y[..., half:2 * half] = hi * c + lo * s
    return y


def rms_norm(x, weight, epsilon):
    """RMSNorm of every head vector of x (T, heads, H) over its H channels, times weight (H,):
    x / sqrt(mean(x^2) + epsilon) * weight, in x's dtype."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + epsilon) * weight


def _split_qkv(query, key, value, num_heads, kv_num_heads, head_size, cd):
    """Q (T, N, H) and K, V (T, Nkv, H) in the compute dtype, unpacking a packed query
    (the latent layout's V: None)."""
    num_tokens = query.shape[0]
    x = np.asarray(query).astype(cd).reshape(num_tokens, query.shape[1] // head_size, head_size)
    if key is None:
        q = x[:, :num_heads]
        k = x[:, num_heads:num_heads + kv_num_heads]
        v = x[:, num_heads + kv_num_heads:]
    else:
        q = x
        k = np.asarray(key).astype(cd).reshape(num_tokens, kv_num_heads, head_size)
        v = (None if value is None else
             np.asarray(value).astype(cd).reshape(num_tokens, kv_num_heads, head_size))
    return q, k, v


def _attend_sequences(q, key_cache, value_cache, cum, past, table, pos, scale, softcap, window,
                      group, cd, sink=None, scales=(None, None), is_causal=True,
                      latent_v=None):
    """Each sequence's new queries q (T, N, H) over its keys in the caches; returns (T, N, Hv)
    (latent_v: Hv of the latent layout, V = the keys' leading Hv channels; None: value_cache)."""
    hv = q.shape[2] if latent_v is None else latent_v
    out = np.zeros(q.shape[:2] + (hv,), dtype=cd)
    for b in range(len(past)):
        start, stop = int(cum[b]), int(cum[b + 1])
        if stop == start:
            continue
        keys, values, mapped = _gather_sequence(key_cache, value_cache, table[b],
                                                int(past[b]) + stop - start, cd, scales,
                                                latent_v)
        for lo in range(start, stop, _QUERY_CHUNK):
            hi = min(lo + _QUERY_CHUNK, stop)
            out[lo:hi] = _attend(q[lo:hi], keys, values, mapped, pos[lo:hi], scale, softcap,
                                 window, group, sink, is_causal)
    return out


def _to_cache(x, cache, scale):
    """New keys or values (tokens, Nkv, H) as the cache stores them: cast, or quantised
    with scale for a one-byte cache."""
    if scale is None:
        return x.astype(cache.dtype)
    return _quant.quantize(x, np.asarray(scale), str(cache.dtype), cache.dtype)


def _from_cache(x, scale, cd):
    """Cached values in compute dtype cd: cast, or dequantised with scale."""
    return x.astype(cd) if scale is None else _quant.dequantize(x, np.asarray(scale), cd)


def _gather_sequence(key_cache, value_cache, table_row, kv_len, cd, scales=(None, None),
                     latent_v=None):
    """Logical K, V (kv_len, Nkv, H) of one sequence and a (kv_len,) mask of mapped positions
    (scales: the caches' (k_scale, v_scale), None for caches in the activations' dtype;
    latent_v: V is K[..., :latent_v], value_cache is None)."""
    block_size = key_cache.shape[1]
    kpos = np.arange(kv_len)
    blocks = table_row[kpos // block_size]
    mapped = blocks >= 0
    if not mapped.any():                      # also covers a cache with no blocks at all
        empty = np.zeros((kv_len,) + key_cache.shape[2:], dtype=cd)
        return empty, empty[..., :latent_v], mapped
    safe = np.where(mapped, blocks, 0)
    keys = _from_cache(key_cache[safe, kpos % block_size], scales[0], cd)
    # Unmapped positions read block 0 as a stand-in: zero them, or a NaN there (a cache from
    # empty()) would leak into the output through 0 * NaN.
    keys[~mapped] = 0
    if latent_v is not None:                  # the latent layout: V is the keys' lead
        return keys, keys[..., :latent_v], mapped
    values = _from_cache(value_cache[safe, kpos % block_size], scales[1], cd)
    values[~mapped] = 0
    return keys, values, mapped


def _attend(q, keys, values, mapped, qpos, scale, softcap, window, group, sink=None,
            is_causal=True):
    """Softmax attention of q (rows, N, H) over one sequence's keys and values (kv_len, Nkv,
    Hv); returns (rows, N, Hv).
    sink: None, or (N,) logits that join each row's denominator and add no value."""
    kpos = np.arange(len(keys))
    visible = mapped[None, :] & ((kpos[None, :] <= qpos[:, None]) | (not is_causal))
    if window > 0:
        visible &= kpos[None, :] >= qpos[:, None] - window + 1
    k = np.repeat(keys, group, axis=1)        # (kv_len, N, H): query head n uses kv head n // G
    v = np.repeat(values, group, axis=1)
    s = np.einsum("qnh,knh->nqk", q, k) * scale
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    s = np.where(visible[None], s, -np.inf)
    if sink is not None:
        return _softmax_with_sink(s, sink[:, None, None], v)
    row_max = s.max(axis=-1, keepdims=True)
    seen = np.isfinite(row_max)
    p = np.exp(s - np.where(seen, row_max, 0.0))
    denom = p.sum(axis=-1, keepdims=True)
    p = p / np.where(seen, denom, 1.0)
    return np.einsum("nqk,knh->qnh", p, v)


def _softmax_with_sink(s, sink, v):
    """sum_k e^(s_k - m) v_k / (e^(sink - m) + sum_k e^(s_k - m)) with m over the keys and the
    sink: s (N, rows, kv_len) logits (-inf hidden), sink (N, 1, 1), v (kv_len, N, H). A row
    with no key gives 0; with no key and a sink of -inf, 0 too."""
    row_max = np.maximum(s.max(axis=-1, keepdims=True), sink)
    shift = np.where(np.isfinite(row_max), row_max, 0.0)
    p = np.exp(s - shift)
    denom = p.sum(axis=-1, keepdims=True) + np.exp(sink - shift)
    p = p / np.where(denom > 0, denom, 1.0)
    return np.einsum("nqk,knh->qnh", p, v)

