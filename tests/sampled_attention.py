"""Float32 attention for a sample of one sequence's query rows, on NumPy or CuPy (``xp``).

For the scale tests, where the full NumPy reference is too slow (a 64k-token prefill, 4096
sequences, 64 heads of 256 channels): the rows are computed from the caches as the call left
them (new keys already written; the tests check those slots separately) and from the query
rotated here. Written from the contract (docs/semantics.md step 4), checked against the
NumPy reference in tests/test_fuzz_reference.py.
"""
import math


def rotate(xp, x, cos, sin, interleaved):
    """Rotary of x (T, heads, H) by per-token cos/sin (T, R/2), float32; channels >= R pass."""
    half = cos.shape[1]
    c = cos[:, None, :].astype(xp.float32)
    s = sin[:, None, :].astype(xp.float32)
    x = x.astype(xp.float32)
    y = x.copy()
    if interleaved:
        a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        y[..., 0:2 * half:2] = a * c - b * s
        y[..., 1:2 * half:2] = b * c + a * s
    else:
        a, b = x[..., :half], x[..., half:2 * half]
        y[..., :half] = a * c - b * s
        y[..., half:2 * half] = b * c + a * s
    return y


def sequence_keys(xp, key_cache, value_cache, table_row, kv_len, to_float32=None):
    """(K, V, mapped) of one sequence's positions [0, kv_len): float32 (kv_len, Nkv, H) each,
    zeros where the block is -1, and the (kv_len,) mask of mapped positions. ``to_float32``
    converts gathered cache slots (default ``.astype(float32)``; e.g. from bf16 bit patterns)."""
    to_float32 = to_float32 or (lambda a: a.astype(xp.float32))
    bs = key_cache.shape[1]
    kpos = xp.arange(kv_len)
    blocks = xp.asarray(table_row)[kpos // bs]
    mapped = blocks >= 0
    if key_cache.shape[0] == 0:               # a cache with no blocks: every position unmapped
        empty = xp.zeros((kv_len,) + tuple(key_cache.shape[2:]), dtype=xp.float32)
        return empty, empty.copy(), mapped
    safe = xp.where(mapped, blocks, 0)
    keep = mapped[:, None, None]             # where(), not a product: poison may be NaN
    keys = xp.where(keep, to_float32(key_cache[safe, kpos % bs]), 0)
    values = xp.where(keep, to_float32(value_cache[safe, kpos % bs]), 0)
    return keys, values, mapped


def attention_rows(xp, q_rows, positions, keys, values, mapped, *, scale, softcap, window,
                   chunk=8):
    """Output (rows, N*H) float32 of query rows ``q_rows`` (rows, N, H), float32 and already
    rotated, at absolute positions ``positions`` (host ints) over one sequence's keys/values
    (kv_len, Nkv, H) and mapped mask (kv_len,). A row that sees no key is 0.
    scale: 0 means 1/sqrt(H). ``chunk`` rows at a time bound the (rows, N, kv_len) scores."""
    rows, N, H = q_rows.shape
    kv_len, Nkv = keys.shape[0], keys.shape[1]
    G = N // Nkv
    scale = scale if scale > 0 else 1.0 / math.sqrt(H)
    kpos = xp.arange(kv_len)
    out = xp.zeros((rows, Nkv, G, H), dtype=xp.float32)
    for lo in range(0, rows, chunk):
        hi = min(lo + chunk, rows)
        q = q_rows[lo:hi].reshape(hi - lo, Nkv, G, H)
        s = xp.einsum("rkgh,tkh->rkgt", q, keys) * xp.float32(scale)
        if softcap > 0:
            s = xp.float32(softcap) * xp.tanh(s / xp.float32(softcap))
        p = xp.asarray(positions[lo:hi])[:, None]
        visible = mapped[None, :] & (kpos[None, :] <= p)
        if window > 0:
            visible &= kpos[None, :] >= p - window + 1
        s = xp.where(visible[:, None, None, :], s, -xp.inf)
        m = s.max(axis=-1, keepdims=True)
        seen = xp.isfinite(m)
        e = xp.exp(s - xp.where(seen, m, 0))
        d = e.sum(axis=-1, keepdims=True)
        e = e / xp.where(seen, d, 1)
        out[lo:hi] = xp.einsum("rkgt,tkh->rkgh", e, values)
    return out.reshape(rows, N * H)
