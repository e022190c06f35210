"""The torch peers: SDPA on dense K/V gathered from the paged cache, and FlexAttention paged.

build_sdpa (sdpa:<backend>[+gather]), drop_dense (frees the dense copies it caches on each
InputSet) and build_flex (flex:paged); their masks, GQA modes and call batching are described
in peers.py's docstring. peers.py re-exports every name here and holds what these read at call
time (``Impl``, ``_sync``, ``DEVICE``, the compiled-flex cache ``_FLEX``): callers use
``peers.build_sdpa`` etc. and set state on peers.
"""
from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from . import cases as C


# --- dense peers: torch SDPA ---------------------------------------------------------------
def _mask_kind(g):
    if g.past == 0:
        return "causal"          # q_len == kv_len
    if g.q_len == 1:
        return "none"
    return "bottom_right"


def _attend(backend, kind, q, k, v, gqa, mask, scale):
    if kind == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=gqa)
    if kind == "none":
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if backend == "flash":
        # torch's own bottom-right path (torch.nn.attention.bias.CausalBias._dispatch)
        return torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False, scale=scale)[0]
    if backend == "efficient":
        return torch.ops.aten._efficient_attention_forward(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias=None,
            cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
            dropout_p=0.0, custom_mask_type=2, compute_log_sumexp=False, scale=scale,
            seqlen_k=None)[0].transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=gqa)


def _group_views(case, s, g):
    """Dense Q (count, N, q, H) view of the query rows of group g (zero copy)."""
    N, H = case.num_heads, case.head_size
    rows = s.q[g.row0:g.row0 + g.count * g.q_len]
    return rows.view(g.count, g.q_len, N, H).transpose(1, 2)


def _gather(case, meta_table_t, s, g):
    """K/V of group g gathered from the paged caches: (count, Nkv, kv_len, H) views."""
    Nkv, H, bs = case.kv_num_heads, case.head_size, case.block_size
    nb = -(-g.kv_len // bs)
    idx = meta_table_t[g.first:g.first + g.count, :nb]
    kd = s.kc[idx].view(g.count, nb * bs, Nkv, H)[:, :g.kv_len].transpose(1, 2)
    vd = s.vc[idx].view(g.count, nb * bs, Nkv, H)[:, :g.kv_len].transpose(1, 2)
    return kd, vd


def build_sdpa(backend, case, meta, sets, gather_timed):
    """torch SDPA restricted to one backend with sdpa_kernel, on the dense equivalent."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
          "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    scale = 1.0 / math.sqrt(case.head_size)
    G = case.group
    grps = C.groups(case, same_past=True)
    table_t = torch.as_tensor(meta.block_table.astype(np.int64), device=P.DEVICE)
    masks = {}
    for gi, g in enumerate(grps):
        if _mask_kind(g) == "bottom_right" and backend == "cudnn":
            masks[gi] = torch.ones(g.q_len, g.kv_len, device=P.DEVICE, dtype=torch.bool).tril(
                diagonal=g.kv_len - g.q_len)

    def dense(s, gi, g, expand):
        key = (gi, expand)
        if key not in s.dense:
            kd, vd = _gather(case, table_t, s, g)
            if expand:
                kd, vd = kd.repeat_interleave(G, dim=1), vd.repeat_interleave(G, dim=1)
            s.dense[key] = (kd, vd)
        return s.dense[key]

    # GQA mode per group: native (enable_gqa / the kernel's own) first, else expanded
    modes, why_expanded = [], {}
    s0 = sets[0]
    for gi, g in enumerate(grps):
        kind = _mask_kind(g)
        if backend == "efficient" and kind == "bottom_right":
            # the direct mem-efficient op takes no GQA: expand rather than probe it
            modes.append(True)
            why_expanded[gi] = "aten._efficient_attention_forward takes no GQA"
            continue
        q = _group_views(case, s0, g)
        kd, vd = _gather(case, table_t, s0, g)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel(be):
                    _attend(backend, kind, q, kd, vd, True, masks.get(gi), scale)
                P._sync()
                modes.append(False)
            except RuntimeError as exc:
                modes.append(True)
                said = [str(w.message) for w in caught] + [str(exc)]
                heads = [m for m in said if "num_heads" in m]
                why_expanded[gi] = (heads[0].split(".")[0][:140] if heads
                                    else str(exc).splitlines()[0][:140])
        del kd, vd
    notes = []
    if why_expanded:
        for why in dict.fromkeys(why_expanded.values()):
            gis = [gi for gi, w in why_expanded.items() if w == why]
            notes.append(f"GQA by expanding K/V to {case.num_heads} heads in group(s) "
                         f"{gis} of {len(grps)} (native refused: {why})")
    kinds = sorted({_mask_kind(g) for g in grps})
    if not any(modes):
        notes.append("GQA: enable_gqa=True" if backend != "flash" or "bottom_right" not in kinds
                     else "GQA: enable_gqa=True / flash's native GQA")
    notes.append(f"{len(grps)} call(s); masks: {', '.join(kinds)}")
    if "bottom_right" in kinds:
        notes.append({"flash": "bottom-right: aten flash is_causal=True",
                      "efficient": "bottom-right: custom_mask_type=2",
                      "cudnn": "bottom-right: explicit bool mask"}[backend])
    if gather_timed:
        notes.append("paged->dense gather (kc[block_ids]) timed")

    def fn(i):
        s = sets[i]
        outs = []
        with sdpa_kernel(be):
            for gi, g in enumerate(grps):
                q = _group_views(case, s, g)
                if gather_timed:
                    kd, vd = _gather(case, table_t, s, g)
                    if modes[gi]:
                        kd, vd = kd.repeat_interleave(G, dim=1), vd.repeat_interleave(G, dim=1)
                else:
                    kd, vd = dense(s, gi, g, modes[gi])
                outs.append(_attend(backend, _mask_kind(g), q, kd, vd, not modes[gi],
                                    masks.get(gi), scale))
        return outs

    if not gather_timed:      # build the dense copies now, outside the timed region
        for s in sets:
            for gi, g in enumerate(grps):
                dense(s, gi, g, modes[gi])

    def row(outputs, b, j):
        for gi, g in enumerate(grps):
            if g.first <= b < g.first + g.count:
                return outputs[gi][b - g.first, :, j, :]
        raise KeyError(b)

    name = f"sdpa:{backend}" + ("+gather" if gather_timed else "")
    return P.Impl(name, "peer", fn, row, notes)


def drop_dense(sets):
    for s in sets:
        s.dense.clear()


# --- paged peer: FlexAttention PagedAttention -----------------------------------------------
def _compiled_flex():
    if "fn" not in P._FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        P._FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return P._FLEX["fn"]


def build_flex(case, meta, sets):
    """FlexAttention paged attention over our caches, viewed as (1, Nkv, blocks*bs, H).

    One PagedAttention page table per run of sequences with equal q_len (one call for the
    uniform cases, two for `mixed`: the 4 chunks, the 60 decodes), filled with our shuffled
    block table; a logical bottom-right causal mask (kv <= q + past[b]) converted to physical
    pages with convert_logical_block_mask. Block-mask KV block = page size, so the kernel's
    BLOCK_N is capped at the page size.
    """
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask

    flex = _compiled_flex()
    Nkv, H, bs = case.kv_num_heads, case.head_size, case.block_size
    scale = 1.0 / math.sqrt(H)
    nb_total = meta.num_blocks
    grps = C.groups(case, same_past=False)
    masks = []
    for g in grps:
        sl = slice(g.first, g.first + g.count)
        pasts = np.asarray(case.past[sl], dtype=np.int64)
        kv = pasts + g.q_len
        nbs = -(-kv // bs)
        paged = PagedAttention(n_pages=nb_total, page_size=bs, max_batch_size=g.count,
                               device=P.DEVICE)
        for bi in range(g.count):
            phys = torch.as_tensor(meta.block_table[g.first + bi, :nbs[bi]].astype(np.int64),
                                   device=P.DEVICE)
            paged.page_table[bi, :nbs[bi]] = phys
            paged.physical_to_logical[bi, phys] = torch.arange(int(nbs[bi]), device=P.DEVICE)
        kv_t = torch.as_tensor(kv, device=P.DEVICE)
        if hasattr(paged, "seq_lens"):
            paged.seq_lens[:g.count] = kv_t
        paged.capacity[:g.count] = torch.as_tensor(nbs * bs, device=P.DEVICE)
        if hasattr(paged, "empty_pages"):
            paged.empty_pages = []
        past_t = torch.as_tensor(pasts, device=P.DEVICE)

        def causal(b, h, q_idx, kv_idx, past_t=past_t):
            return kv_idx <= q_idx + past_t[b]

        logical = create_block_mask(causal, g.count, None, g.q_len, int(nbs.max()) * bs,
                                    device=P.DEVICE, BLOCK_SIZE=(128, bs))
        extra = ({"kv_len": kv_t} if "kv_len" in inspect.signature(
            paged.convert_logical_block_mask).parameters else {})
        masks.append(paged.convert_logical_block_mask(logical, **extra))
    kernel_options = {"BLOCK_N": bs} if bs < 64 else None

    views = []
    for s in sets:
        kview = s.kc.view(1, nb_total * bs, Nkv, H).permute(0, 2, 1, 3)
        vview = s.vc.view(1, nb_total * bs, Nkv, H).permute(0, 2, 1, 3)
        views.append((kview, vview))

    def fn(i):
        s = sets[i]
        kview, vview = views[i]
        outs = []
        for g, m in zip(grps, masks):
            q = _group_views(case, s, g)
            outs.append(flex(q, kview, vview, block_mask=m, scale=scale, enable_gqa=True,
                             kernel_options=kernel_options))
        return outs

    def row(outputs, b, j):
        for gi, g in enumerate(grps):
            if g.first <= b < g.first + g.count:
                return outputs[gi][b - g.first, :, j, :]
        raise KeyError(b)

    notes = [f"{len(grps)} call(s); reads the paged caches in place; enable_gqa=True",
             f"kernel_options={kernel_options}", "compiled (torch.compile, dynamic=False)"]
    return P.Impl("flex:paged", "peer", fn, row, notes)


# Last, so either module may be imported first: every name here exists when peers.py, at its
# end, imports them back. P.* is read only at call time.
from . import peers as P  # noqa: E402
