"""A deliberately naive PagedAttention, written line by line from the contract
(spec/semantics.md, "What happens, in order").

It is the second opinion the NumPy reference is tested against, so it shares nothing with it:
Python loops over sequences, tokens, heads and keys, float64 scalars, the block table walked
key by key. It is slow on purpose; keep the test shapes small.
"""
import math

import numpy


def visible_positions(block_table_row, block_size, p, window, kv_len=None):
    """Positions k of one sequence that the token at absolute position p sees (spec step 4);
    kv_len given: not causal, every position below it (no window)."""
    seen = []
    for k in range(p + 1 if kv_len is None else kv_len):   # bottom-right causal: k <= p
        if window > 0 and k < p - window + 1:       # exactly W keys counting itself
            continue
        if int(block_table_row[k // block_size]) == -1:   # unmapped block: masked
            continue
        seen.append(k)
    return seen


def _scale_of(scale, h, c):
    """Channel c of kv head h's scale: per tensor (1,) or per channel (Nkv, 1, H)."""
    return float(scale[0]) if scale.shape == (1,) else float(scale[h, 0, c])


def _store(x, dtype, scale, h):
    """One head vector as a cache of ``dtype`` stores it: a cast, or one-byte quantisation
    (int8: round half to even, clamp to [-128, 127]; e4m3: clamp to +-448, then the cast)."""
    if scale is None:
        return x
    out = []
    for c, v in enumerate(x):
        y = float(v) / _scale_of(scale, h, c)
        if str(numpy.dtype(dtype)) == "int8":
            out.append(min(127.0, max(-128.0, float(numpy.rint(y)))))
        else:
            out.append(min(448.0, max(-448.0, y)))
    return numpy.array(out, dtype=numpy.float64).astype(dtype)


def _load(x, scale, h):
    """One cached head vector in float64: dequantised with its scale when it has one."""
    x = numpy.asarray(x).astype(numpy.float64)
    if scale is None:
        return x
    return numpy.array([v * _scale_of(scale, h, c) for c, v in enumerate(x)])


def _rms(x, weight, epsilon):
    """RMSNorm of one head vector (float64), times weight."""
    mean_square = sum(float(v) * float(v) for v in x) / len(x)
    inv = 1.0 / math.sqrt(mean_square + float(epsilon))
    return numpy.array([float(v) * inv * float(w) for v, w in zip(x, weight)],
                       dtype=numpy.float64)


def _rotate(x, cos_row, sin_row, interleaved):
    """Rotate one head vector x (float64, length H) with one cos/sin row (length R/2)."""
    y = [float(v) for v in x]                        # channels >= R pass through
    half = len(cos_row)
    for i in range(half):
        c = float(cos_row[i])
        s = float(sin_row[i])
        if interleaved:                              # GPT-J: pairs (2i, 2i+1)
            a, b = float(x[2 * i]), float(x[2 * i + 1])
            y[2 * i] = a * c - b * s
            y[2 * i + 1] = b * c + a * s
        else:                                        # GPT-NeoX: pairs (i, i + R/2)
            a, b = float(x[i]), float(x[i + half])
            y[i] = a * c - b * s
            y[i + half] = b * c + a * s
    return numpy.array(y, dtype=numpy.float64)


def naive_paged_attention(query, key, value, key_cache, value_cache,
                          cumulative_sequence_length, past_seqlens, block_table,
                          cos_cache=None, sin_cache=None, *,
                          num_heads, kv_num_heads, scale=0.0, softcap=0.0,
                          local_window_size=-1, do_rotary=False, rotary_interleaved=False,
                          head_sink=None, slot_mapping=None, q_norm_weight=None,
                          k_norm_weight=None, qk_norm_epsilon=1e-6, rotary_offset=0,
                          k_scale=None, v_scale=None, is_causal=True,
                          kv_cache_layout="standard", v_head_size=None):
    """Return (out, new_key_cache, new_value_cache); the caches given are not modified.
    head_sink: None, or (N,) sink logits that join each row's denominator (no value).
    slot_mapping: None, or (T,) flat write slots (-1: not stored). q_norm_weight,
    k_norm_weight: RMSNorm weights (H,) of every query / key head, before rotary.
    rotary_offset: the first rotated channel. k_scale, v_scale: scales (1,) or (Nkv, 1, H) of
    an int8 / float8_e4m3fn cache: quantised element by element on write, times the scale on
    read. kv_cache_layout="latent": one kv head, no value / value_cache; V of a key is the
    first v_head_size (None: H) channels of what the key cache holds for it (read back,
    dequantised with k_scale).

    out is (T, N*H) in query.dtype ((T, N*v_head_size) latent); the new caches are copies in
    the caches' dtype (latent: the new value cache is None).
    """
    N, Nkv = int(num_heads), int(kv_num_heads)
    G = N // Nkv
    num_blocks, bs, _, H = key_cache.shape
    T = query.shape[0]
    B = len(past_seqlens)
    cum = [int(c) for c in cumulative_sequence_length]
    past = [int(p) for p in past_seqlens]
    latent = kv_cache_layout == "latent"
    Hv = (v_head_size or H) if latent else H
    kc = key_cache.copy()
    vc = None if latent else value_cache.copy()
    if scale == 0.0:                                # any other value as given, negative too
        scale = 1.0 / math.sqrt(H)

    # 1. split packed QKV: a row is [Q heads | K heads | V heads]
    q_all = numpy.asarray(query, dtype=numpy.float64)
    if latent:                                      # no V of its own: it is read from kc
        k_all = numpy.asarray(key, dtype=numpy.float64)
        v_all = numpy.zeros_like(k_all)
    elif key is None:
        k_all = q_all[:, N * H:(N + Nkv) * H]
        v_all = q_all[:, (N + Nkv) * H:(N + 2 * Nkv) * H]
        q_all = q_all[:, :N * H]
    else:
        k_all = numpy.asarray(key, dtype=numpy.float64)
        v_all = numpy.asarray(value, dtype=numpy.float64)

    # per token t: lists of head vectors (float64), rotated if asked
    q_heads = [[q_all[t, n * H:(n + 1) * H].copy() for n in range(N)] for t in range(T)]
    k_heads = [[k_all[t, h * H:(h + 1) * H].copy() for h in range(Nkv)] for t in range(T)]
    v_heads = [[v_all[t, h * H:(h + 1) * H].copy() for h in range(Nkv)] for t in range(T)]

    for b in range(B):
        for j in range(cum[b + 1] - cum[b]):
            t = cum[b] + j
            p = past[b] + j
            # 1b. QK-norm: each head vector over its H channels
            if q_norm_weight is not None:
                for n in range(N):
                    q_heads[t][n] = _rms(q_heads[t][n], q_norm_weight, qk_norm_epsilon)
                for h in range(Nkv):
                    k_heads[t][h] = _rms(k_heads[t][h], k_norm_weight, qk_norm_epsilon)
            # 2. rotary at absolute position p, channels [offset, offset + R)
            if do_rotary:
                cos_row = numpy.asarray(cos_cache[p], dtype=numpy.float64)
                sin_row = numpy.asarray(sin_cache[p], dtype=numpy.float64)
                o = int(rotary_offset)
                for n in range(N):
                    q_heads[t][n][o:] = _rotate(q_heads[t][n][o:], cos_row, sin_row,
                                                rotary_interleaved)
                for h in range(Nkv):
                    k_heads[t][h][o:] = _rotate(k_heads[t][h][o:], cos_row, sin_row,
                                                rotary_interleaved)
            # 3. cache write, token by token; an unmapped block (or slot -1) is skipped
            if slot_mapping is not None:
                flat = int(slot_mapping[t])
                if flat == -1:
                    continue
                blk, off = flat // bs, flat % bs
            else:
                blk, off = int(block_table[b][p // bs]), p % bs
                if blk == -1:
                    continue
            for h in range(Nkv):
                kc[blk, off, h, :] = _store(k_heads[t][h], kc.dtype, k_scale, h)
                if not latent:
                    vc[blk, off, h, :] = _store(v_heads[t][h], vc.dtype, v_scale, h)

    # 4. attention, reading every key (old and new) from the written caches
    out = numpy.zeros((T, N * Hv), dtype=numpy.float64)
    for b in range(B):
        for j in range(cum[b + 1] - cum[b]):
            t = cum[b] + j
            p = past[b] + j
            kv_len = None if is_causal else past[b] + cum[b + 1] - cum[b]
            keys = visible_positions(block_table[b], bs, p, local_window_size, kv_len)
            for n in range(N):
                h = n // G
                q = q_heads[t][n]
                scores = []
                for k in keys:
                    blk = int(block_table[b][k // bs])
                    kv = _load(kc[blk, k % bs, h, :], k_scale, h)
                    s = scale * float(numpy.dot(q, kv))
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    scores.append(s)
                if not scores:
                    continue                          # a row that sees no key is 0
                sink = None if head_sink is None else float(head_sink[n])
                m = max(scores + ([sink] if sink is not None else []))
                weights = [math.exp(s - m) for s in scores]
                total = sum(weights)
                if sink is not None:
                    total += math.exp(sink - m)       # the sink: in the denominator only
                acc = numpy.zeros(Hv, dtype=numpy.float64)
                for w, k in zip(weights, keys):
                    blk = int(block_table[b][k // bs])
                    if latent:                        # V: the cached key's first Hv channels
                        v = _load(kc[blk, k % bs, h, :], k_scale, h)[:Hv]
                    else:
                        v = _load(vc[blk, k % bs, h, :], v_scale, h)
                    acc += (w / total) * v
                out[t, n * Hv:(n + 1) * Hv] = acc
    return out.astype(query.dtype), kc, vc
