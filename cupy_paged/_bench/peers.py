"""Inputs on the GPU, the implementations timed (ours and the peers), and the row check.

Import only on a machine with torch, CuPy and a GPU (run.py imports it lazily).

Every implementation is an ``Impl``: ``fn(i)`` enqueues one call on input set i on the
current torch stream (CuPy is pointed at the same stream by run.py) and returns its outputs;
``row(outputs, b, j)`` returns the (N, H) output of new token j of sequence b, which the
check compares with a float32 recomputation from the paged cache.

Peers (all on the dense or paged equivalent of the same data, in the same process):
  sdpa:<flash|efficient|cudnn>         K/V gathered from the paged cache into dense
                                       (count, Nkv, S, H) views before timing (untimed)
  sdpa:<...>+gather                    the same with the paged->dense gather (torch
                                       indexing, kc[block_ids]) inside the timed region
  flex:paged                           torch's FlexAttention PagedAttention (compiled
                                       flex_attention), reading our caches in place
Dense peers batch each run of consecutive sequences with equal (q_len, past) into one call
(one call for prefill_8x2048 and the decodes, five for `mixed`: 4 chunks + 60 decodes).
Masks: past 0 -> is_causal=True (q_len == kv_len, top-left == bottom-right); q_len 1 -> no
mask; otherwise bottom-right causal: flash through aten._scaled_dot_product_flash_attention
(is_causal=True means bottom-right there, as torch.nn.attention.bias.causal_lower_right uses
it), efficient through aten._efficient_attention_forward(custom_mask_type=2, causal from
bottom-right), cuDNN with an explicit boolean bottom-right mask. GQA: enable_gqa=True (or the
kernel's native GQA) where the kernel takes it, else K/V expanded to N heads with
repeat_interleave (before timing, or inside it for +gather); each row records which.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from . import cases as C

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SDPA_BACKENDS = ("flash", "efficient", "cudnn")
CHECK_TOL = 1e-2      # relative L2 error of the sampled rows (fp16 inputs and output)
DEVICE = "cuda"       # a CPU smoke test of the plumbing may set "cpu"


@dataclasses.dataclass
class Impl:
    name: str
    kind: str                 # "ours" | "peer"
    fn: object                # fn(i) -> outputs
    row: object               # row(outputs, b, j) -> (N, H) tensor
    notes: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class InputSet:
    q: object
    k: object
    v: object
    kc: object
    vc: object
    cum: object
    past: object
    table: object
    out: object
    dense: dict = dataclasses.field(default_factory=dict)   # cached dense K/V per group


# --- inputs --------------------------------------------------------------------------------
def make_sets(case, meta, n_sets, seed=0):
    """n_sets independent random input sets on the GPU (caches random, never zeros).

    The new tokens' K/V are written into the caches here (untimed), so the caches hold what
    they hold after the op's prologue and the dense peers see the same keys as ours.
    """
    dt = DTYPES[case.dtype]
    T, N, Nkv, H, bs = (case.num_tokens, case.num_heads, case.kv_num_heads, case.head_size,
                        case.block_size)
    blk, off = C.token_slots(case, meta)
    blk_t = torch.as_tensor(blk, device=DEVICE)
    off_t = torch.as_tensor(off, device=DEVICE)
    out = []
    for i in range(n_sets):
        g = torch.Generator(device=DEVICE)
        g.manual_seed(1000 * seed + i + 1)

        def rnd(*shape, g=g):
            return torch.randn(*shape, generator=g, device=DEVICE, dtype=dt)

        s = InputSet(
            q=rnd(T, N * H), k=rnd(T, Nkv * H), v=rnd(T, Nkv * H),
            kc=rnd(meta.num_blocks, bs, Nkv, H), vc=rnd(meta.num_blocks, bs, Nkv, H),
            cum=torch.as_tensor(meta.cumulative_sequence_length, device=DEVICE),
            past=torch.as_tensor(meta.past_seqlens, device=DEVICE),
            table=torch.as_tensor(meta.block_table, device=DEVICE),
            out=torch.full((T, N * H), float("nan"), device=DEVICE, dtype=dt))
        if T:
            s.kc[blk_t, off_t] = s.k.view(T, Nkv, H)
            s.vc[blk_t, off_t] = s.v.view(T, Nkv, H)
        out.append(s)
    _sync()
    return out


def _sync():
    if DEVICE != "cpu":
        torch.cuda.synchronize()


def reference_rows(case, meta, s, rows):
    """{(b, j): (N, H) float32} recomputed from the paged cache of input set s."""
    N, G, H, bs = case.num_heads, case.group, case.head_size, case.block_size
    scale = 1.0 / math.sqrt(H)
    ref = {}
    for b, j in rows:
        p = int(meta.past_seqlens[b]) + j
        pos = np.arange(p + 1)
        blk = torch.as_tensor(meta.block_table[b, pos // bs].astype(np.int64), device=DEVICE)
        off = torch.as_tensor(pos % bs, device=DEVICE)
        K = s.kc[blk, off].float().repeat_interleave(G, dim=1)     # (p+1, N, H)
        V = s.vc[blk, off].float().repeat_interleave(G, dim=1)
        q = s.q[int(meta.cumulative_sequence_length[b]) + j].view(N, H).float()
        w = torch.softmax(torch.einsum("nh,knh->nk", q, K) * scale, dim=-1)
        ref[(b, j)] = torch.einsum("nk,knh->nh", w, V)
    return ref


def check(impl, outputs, ref):
    """Relative L2 error of impl's sampled rows against ref; NaN counts as a failure."""
    got = torch.stack([impl.row(outputs, b, j).float() for (b, j) in ref])
    want = torch.stack(list(ref.values()))
    err = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))
    ok = bool(torch.isfinite(got).all()) and err < CHECK_TOL
    return {"rel_err": err, "rows": len(ref), "ok": ok, "tol": CHECK_TOL}


# --- ours ----------------------------------------------------------------------------------
def build_ours(backend, case, meta, sets, options=None):
    """cupy_paged.paged_attention(..., backend=backend) on CuPy views of the torch tensors.

    Timed as the user calls it: validation of shapes on the host, the prologue (new K/V
    written into the caches; no rotary here) and the attention. out= is preallocated.
    options: a ``cupy_paged.PlanOptions`` (tile, split count, launch mode), or None.
    """
    import cupy

    import cupy_paged as cpg

    params = inspect.signature(cpg.paged_attention).parameters
    hints = {}
    if "max_seqlen_q" in params:
        hints["max_seqlen_q"] = max(case.q_lens)
    if "max_seqlen_k" in params:
        hints["max_seqlen_k"] = max(case.kv_lens)
    if "total_kv_tokens" in params:
        hints["total_kv_tokens"] = sum(case.kv_lens)
    if options is not None:
        hints["options"] = options
    views = [{name: cupy.asarray(getattr(s, name)) for name in
              ("q", "k", "v", "kc", "vc", "cum", "past", "table", "out")} for s in sets]

    def fn(i):
        a = views[i]
        return cpg.paged_attention(
            a["q"], a["k"], a["v"], a["kc"], a["vc"], a["cum"], a["past"], a["table"],
            num_heads=case.num_heads, kv_num_heads=case.kv_num_heads, backend=backend,
            out=a["out"], **hints)

    cum = meta.cumulative_sequence_length
    N, H = case.num_heads, case.head_size

    def row(outputs, b, j):
        return torch.as_tensor(outputs, device="cuda")[int(cum[b]) + j].view(N, H)

    notes = ["includes the prologue (new K/V written into the paged caches)"]
    if hints:
        notes.append("host bounds passed: " + ", ".join(
            f"{k}={v}" for k, v in hints.items() if k != "options"))
    return Impl(f"ours:{backend}", "ours", fn, row, notes)


def build_mea_attention_only(case, meta, sets):
    """The mea backend's attention kernel alone, the counterpart of the SDPA rows whose gather
    is not timed: the packed K/V gather (and the prologue, already reflected in the caches)
    run once before timing; only ``launch_fmha`` is timed."""
    import cupy

    from cupy_paged import _validate
    from cupy_paged.backends import _gather, _mea_kernels

    N, H = case.num_heads, case.head_size
    rows = sum(case.kv_lens)
    sm = int(cupy.cuda.Device().compute_capability)
    prepared = []
    for s in sets:
        a = {"query": cupy.asarray(s.q), "key": cupy.asarray(s.k), "value": cupy.asarray(s.v),
             "key_cache": cupy.asarray(s.kc), "value_cache": cupy.asarray(s.vc),
             "cumulative_sequence_length": cupy.asarray(s.cum),
             "past_seqlens": cupy.asarray(s.past), "block_table": cupy.asarray(s.table),
             "cos_cache": None, "sin_cache": None, "out": cupy.asarray(s.out)}
        problem = _validate.check_arguments(
            a, num_heads=N, kv_num_heads=case.kv_num_heads, scale=0.0, softcap=0.0,
            local_window_size=-1, do_rotary=False, rotary_interleaved=False,
            total_kv_tokens=rows)
        seqstart = _gather.kv_seqstarts(problem, a["cumulative_sequence_length"],
                                        a["past_seqlens"])
        k_packed, v_packed = _gather.gather_kv(problem, a, seqstart, rows)
        n_accum = _mea_kernels.workspace_elements(problem)
        accum = cupy.empty(n_accum, dtype=cupy.float32) if n_accum else None
        prepared.append((problem, a, seqstart, k_packed, v_packed, accum))

    def fn(i):
        problem, a, seqstart, k_packed, v_packed, accum = prepared[i]
        _mea_kernels.launch_fmha(problem, a["query"], N * H, k_packed, v_packed, a["out"],
                                 accum, a["cumulative_sequence_length"], seqstart,
                                 a["block_table"], max(case.q_lens), sm)
        return a["out"]

    cum = meta.cumulative_sequence_length

    def row(outputs, b, j):
        return torch.as_tensor(outputs, device="cuda")[int(cum[b]) + j].view(N, H)

    return Impl("ours:mea-attn", "ours", fn, row,
                ["attention kernel only: gather and prologue done before timing"])


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
    table_t = torch.as_tensor(meta.block_table.astype(np.int64), device=DEVICE)
    masks = {}
    for gi, g in enumerate(grps):
        if _mask_kind(g) == "bottom_right" and backend == "cudnn":
            masks[gi] = torch.ones(g.q_len, g.kv_len, device=DEVICE, dtype=torch.bool).tril(
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
                _sync()
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
    return Impl(name, "peer", fn, row, notes)


def drop_dense(sets):
    for s in sets:
        s.dense.clear()


# --- paged peer: FlexAttention PagedAttention -----------------------------------------------
_FLEX = {}


def _compiled_flex():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


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
                               device=DEVICE)
        for bi in range(g.count):
            phys = torch.as_tensor(meta.block_table[g.first + bi, :nbs[bi]].astype(np.int64),
                                   device=DEVICE)
            paged.page_table[bi, :nbs[bi]] = phys
            paged.physical_to_logical[bi, phys] = torch.arange(int(nbs[bi]), device=DEVICE)
        kv_t = torch.as_tensor(kv, device=DEVICE)
        if hasattr(paged, "seq_lens"):
            paged.seq_lens[:g.count] = kv_t
        paged.capacity[:g.count] = torch.as_tensor(nbs * bs, device=DEVICE)
        if hasattr(paged, "empty_pages"):
            paged.empty_pages = []
        past_t = torch.as_tensor(pasts, device=DEVICE)

        def causal(b, h, q_idx, kv_idx, past_t=past_t):
            return kv_idx <= q_idx + past_t[b]

        logical = create_block_mask(causal, g.count, None, g.q_len, int(nbs.max()) * bs,
                                    device=DEVICE, BLOCK_SIZE=(128, bs))
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
    return Impl("flex:paged", "peer", fn, row, notes)
