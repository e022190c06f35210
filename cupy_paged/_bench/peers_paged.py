"""The paged peers a user would pick instead of us: FlashInfer and cuDNN with page tables.

Same process, same paged caches as our kernel (num_blocks, block_size, Nkv, H), read in place
(no copy, no dense gather): FlashInfer's kv_layout "NHD" is exactly that layout; cuDNN sees
the caches as (num_blocks, Nkv, block_size, H) containers with strides (bs*Nkv*H, H, Nkv*H, 1).
Our block table is translated once per builder (outside the timed region) into FlashInfer's
paged_kv_indptr / paged_kv_indices / paged_kv_last_page_len and into cuDNN's (B, 1, pages, 1)
page tables (``flashinfer_page_metadata``, ``cudnn_page_table``: pure NumPy, tested on CPU).

  flashinfer-fa2 / -fa3      BatchPrefillWithPagedKVCacheWrapper(backend="fa2" | "fa3"),
                             plan(causal=True) once, run() timed; prefill and mixed cases,
                             and fa3 also on the decode cases
  flashinfer-decode[-tc]     BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=False|True),
                             decode cases only (q_len 1 for every sequence)
  cudnn-paged                cudnn.pygraph sdpa with paged_attention_k_table / _v_table /
                             _max_seq_len_kv, padding mask + seq_len_q / seq_len_kv,
                             bottom-right causal (none when every q_len is 1); Q/O ragged
                             (THD, ragged offsets) when q_lens differ, else plain BSHD strides
Causal alignment: FlashInfer's causal mask is bottom-right (query j of a sequence with kv_len
L and q_len n sees keys <= L - n + j), which is our contract (keys 0..past+j). GQA is native
in both. Scale 1/sqrt(H) as in the reference. The peers do NOT write the new K/V into the
caches (ours does; make_sets already put them there); every row's notes say so.

Import needs neither torch, flashinfer nor cudnn: they are imported inside the builders.
FlashInfer JIT-compiles its kernels on first use (~90 s for all four kinds); ``start_warmup``
starts that in a background thread at the beginning of the run, and the builders wait for it.
"""
from __future__ import annotations

import math
import threading

import numpy as np

FLASHINFER_KINDS = ("fa2", "fa3", "decode", "decode-tc")
PEER_NAMES = {f"flashinfer-{k}": k for k in FLASHINFER_KINDS}
CUDNN_PEER = "cudnn-paged"
WORKSPACE_BYTES = 128 * 2 ** 20     # FlashInfer's recommended float workspace
NO_WRITE_NOTE = "does not write the new K/V into the caches (ours does); attention only"


# --- block table translations (pure NumPy) --------------------------------------------------
def _pages(kv_lens, block_size, table):
    kv = np.asarray(kv_lens, dtype=np.int64).reshape(-1)
    if (kv < 0).any():
        raise ValueError("negative kv length")
    pages = -(-kv // int(block_size))
    if table.shape[0] != kv.shape[0]:
        raise ValueError(f"block table has {table.shape[0]} rows for {kv.shape[0]} sequences")
    if pages.size and pages.max(initial=0) > table.shape[1]:
        raise ValueError("block table too narrow for the kv lengths")
    return kv, pages


def flashinfer_page_metadata(block_table, kv_lens, block_size):
    """(paged_kv_indptr (B+1,), paged_kv_indices (sum pages,), paged_kv_last_page_len (B,)).

    int32 NumPy arrays. Sequence b owns ceil(kv_lens[b] / block_size) pages, the first ones of
    its block-table row; its last page holds ((kv - 1) % block_size) + 1 tokens (0 for an
    empty sequence, which owns no page: FlashInfer's kv_len = (pages - 1)*bs + last, clamped).
    block_table: (B, max_blocks) NumPy or CPU torch, -1 padded.
    """
    table = np.asarray(block_table).astype(np.int64)
    kv, pages = _pages(kv_lens, block_size, table)
    indptr = np.zeros(kv.shape[0] + 1, dtype=np.int32)
    indptr[1:] = np.cumsum(pages)
    parts = [table[b, :pages[b]] for b in range(kv.shape[0])]
    indices = (np.concatenate(parts) if parts else np.zeros(0, np.int64)).astype(np.int32)
    if (indices < 0).any():
        raise ValueError("block table has -1 among a sequence's needed blocks")
    last = np.where(kv > 0, (kv - 1) % int(block_size) + 1, 0).astype(np.int32)
    return indptr, indices, last


def cudnn_page_table(block_table, kv_lens, block_size, max_pages=None):
    """cuDNN's page table: int32 (B, 1, max_pages, 1), row b = the block ids of sequence b's
    ceil(kv / block_size) pages, then 0 (a valid block id; cuDNN reads no page past
    seq_len_kv). max_pages defaults to the largest page count (at least 1)."""
    table = np.asarray(block_table).astype(np.int64)
    kv, pages = _pages(kv_lens, block_size, table)
    mp = int(max(1, pages.max(initial=0))) if max_pages is None else int(max_pages)
    out = np.zeros((kv.shape[0], 1, mp, 1), dtype=np.int32)
    for b in range(kv.shape[0]):
        row = table[b, :pages[b]]
        if (row < 0).any():
            raise ValueError("block table has -1 among a sequence's needed blocks")
        out[b, 0, :pages[b], 0] = row
    return out


def is_decode(case):
    """Every sequence has exactly one new token."""
    return case.batch > 0 and all(q == 1 for q in case.q_lens)


def specs_for(case, wanted):
    """[(peer name, builder kind)] of the paged peers in `wanted` that apply to `case`:
    prefill wrappers (fa2, fa3) on prefill/mixed cases, decode wrappers and fa3 on decodes."""
    dec = is_decode(case)
    out = []
    for name, kind in PEER_NAMES.items():
        applies = (kind == "fa3" or (kind.startswith("decode") == dec))
        if name in wanted and applies:
            out.append((name, kind))
    if CUDNN_PEER in wanted:
        out.append((CUDNN_PEER, "cudnn"))
    return out


def _unsupported(msg):
    try:
        from cupy_paged import UnsupportedError
    except Exception:            # pragma: no cover - cupy_paged always importable here
        return RuntimeError(msg)
    return UnsupportedError(msg)


# --- FlashInfer -----------------------------------------------------------------------------
_WARM = {"thread": None, "errors": {}}


def _import_flashinfer():
    try:
        import flashinfer
    except Exception as exc:
        raise _unsupported(f"flashinfer not importable: {type(exc).__name__}: {exc}") from None
    return flashinfer


def _wrapper(fi, kind, ws):
    if kind in ("fa2", "fa3"):
        return fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=kind)
    return fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD",
                                                 use_tensor_cores=(kind == "decode-tc"))


def _plan(w, kind, qo_indptr, indptr, indices, last, N, Nkv, H, bs, dt, scale):
    if kind in ("fa2", "fa3"):
        w.plan(qo_indptr, indptr, indices, last, N, Nkv, H, bs, causal=True, sm_scale=scale,
               q_data_type=dt, kv_data_type=dt)
    else:
        w.plan(indptr, indices, last, N, Nkv, H, bs, sm_scale=scale, q_data_type=dt,
               kv_data_type=dt)


def start_warmup(kinds, num_heads=32, kv_num_heads=8, head_size=128, dtype="float16"):
    """Compile FlashInfer's modules for `kinds` in a daemon thread (a tiny plan + run each, on
    its own stream); builders call wait_warmup() first. False when flashinfer is absent."""
    kinds = [k for k in kinds if k in FLASHINFER_KINDS]
    if not kinds or _WARM["thread"] is not None:
        return False
    try:
        fi = _import_flashinfer()
    except Exception:
        return False

    def work():
        import torch

        from . import peers as P
        dt = P.DTYPES[dtype]
        N, Nkv, H, bs = num_heads, kv_num_heads, head_size, 16
        with torch.cuda.stream(torch.cuda.Stream()):
            for kind in kinds:
                try:
                    q_len = 2 if kind in ("fa2", "fa3") else 1
                    i32 = dict(dtype=torch.int32, device="cuda")
                    ws = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
                    kc = torch.randn(1, bs, Nkv, H, dtype=dt, device="cuda")
                    w = _wrapper(fi, kind, ws)
                    _plan(w, kind, torch.tensor([0, q_len], **i32), torch.tensor([0, 1], **i32),
                          torch.tensor([0], **i32), torch.tensor([3], **i32), N, Nkv, H, bs, dt,
                          1.0 / math.sqrt(H))
                    w.run(torch.randn(q_len, N, H, dtype=dt, device="cuda"), (kc, kc))
                    torch.cuda.current_stream().synchronize()
                except Exception as exc:       # the row of this kind reports it again
                    _WARM["errors"][kind] = f"{type(exc).__name__}: {exc}"[:300]

    t = threading.Thread(target=work, name="flashinfer-jit", daemon=True)
    _WARM["thread"] = t
    t.start()
    return True


def wait_warmup():
    t = _WARM["thread"]
    if t is not None:
        t.join()


def build_flashinfer(kind, case, meta, sets):
    """A FlashInfer paged wrapper on our caches: plan() here, run() timed."""
    fi = _import_flashinfer()
    wait_warmup()
    import torch

    from . import peers as P
    if kind.startswith("decode") and not is_decode(case):
        raise _unsupported("BatchDecodeWithPagedKVCacheWrapper: q_len 1 for every sequence only")
    dev, dt = P.DEVICE, P.DTYPES[case.dtype]
    N, Nkv, H, bs, T = (case.num_heads, case.kv_num_heads, case.head_size, case.block_size,
                        case.num_tokens)
    indptr, indices, last = flashinfer_page_metadata(meta.block_table, case.kv_lens, bs)

    def i32(a):
        return torch.as_tensor(np.asarray(a), dtype=torch.int32, device=dev)

    ws = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
    w = _wrapper(fi, kind, ws)
    _plan(w, kind, i32(meta.cumulative_sequence_length), i32(indptr), i32(indices), i32(last),
          N, Nkv, H, bs, dt, 1.0 / math.sqrt(H))
    views = [(s.q.view(T, N, H), (s.kc, s.vc), torch.empty(T, N, H, dtype=dt, device=dev))
             for s in sets]

    def fn(i):
        q, kv, out = views[i]
        return w.run(q, kv, out=out)

    cum = meta.cumulative_sequence_length

    def row(outputs, b, j):
        return outputs[int(cum[b]) + j]

    wrapper = ("BatchPrefillWithPagedKVCacheWrapper" if kind in ("fa2", "fa3")
               else "BatchDecodeWithPagedKVCacheWrapper")
    notes = [f"flashinfer {getattr(fi, '__version__', '?')} {wrapper} kv_layout=NHD "
             + (f"backend={kind} causal=True (bottom-right)" if kind in ("fa2", "fa3") else
                f"use_tensor_cores={kind == 'decode-tc'}"),
             "plan() untimed, run(out=) timed; reads our caches in place; native GQA",
             NO_WRITE_NOTE]
    try:
        notes.append(f"resolved backend: {w.resolved_backend}")
    except Exception:
        pass
    if kind in _WARM["errors"]:
        notes.append(f"warm-up error: {_WARM['errors'][kind][:120]}")
    return P.Impl(f"flashinfer-{kind}", "peer", fn, row, notes)


# --- cuDNN ------------------------------------------------------------------------------------
def build_cudnn(case, meta, sets):
    """cuDNN SDPA (cudnn-frontend graph API) with page tables on our caches; graph built here,
    execute() timed."""
    try:
        import cudnn
    except Exception as exc:
        raise _unsupported(f"cudnn (frontend) not importable: {type(exc).__name__}: {exc}") \
            from None
    import torch

    from . import peers as P
    dev, dt = P.DEVICE, P.DTYPES[case.dtype]
    cdt = {torch.float16: cudnn.data_type.HALF, torch.bfloat16: cudnn.data_type.BFLOAT16}.get(dt)
    if cdt is None:
        raise _unsupported(f"cudnn-paged: dtype {case.dtype} not run")
    B, N, Nkv, H, bs, T = (case.batch, case.num_heads, case.kv_num_heads, case.head_size,
                           case.block_size, case.num_tokens)
    nb, sq = meta.num_blocks, max(case.q_lens)
    kv_lens = case.kv_lens
    table = cudnn_page_table(meta.block_table, kv_lens, bs)
    mp = table.shape[2]
    ragged = len(set(case.q_lens)) > 1
    causal = sq > 1
    i32 = cudnn.data_type.INT32

    g = cudnn.pygraph(io_data_type=cdt, intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT)
    q_stride = [sq * N * H, H, N * H, 1]                 # BSHD: our packed (T, N*H) rows
    rag = (g.tensor(dim=[B + 1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32, name="ragged_q")
           if ragged else None)
    q = g.tensor(dim=[B, N, sq, H], stride=q_stride, data_type=cdt, name="q",
                 ragged_offset=rag)
    c_stride = [bs * Nkv * H, H, Nkv * H, 1]             # our (blocks, bs, Nkv, H) cache
    k = g.tensor(dim=[nb, Nkv, bs, H], stride=c_stride, data_type=cdt, name="container_k")
    v = g.tensor(dim=[nb, Nkv, bs, H], stride=c_stride, data_type=cdt, name="container_v")
    one = dict(dim=[B, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32)
    seq_q, seq_kv = g.tensor(name="seq_len_q", **one), g.tensor(name="seq_len_kv", **one)
    pt = dict(dim=[B, 1, mp, 1], stride=[mp, mp, 1, 1], data_type=i32)
    pt_k, pt_v = g.tensor(name="page_table_k", **pt), g.tensor(name="page_table_v", **pt)
    mask = {"use_causal_mask_bottom_right": True} if causal else {}
    res = g.sdpa(q, k, v, name="sdpa", generate_stats=False, attn_scale=1.0 / math.sqrt(H),
                 use_padding_mask=True, seq_len_q=seq_q, seq_len_kv=seq_kv,
                 paged_attention_k_table=pt_k, paged_attention_v_table=pt_v,
                 paged_attention_max_seq_len_kv=int(max(kv_lens)), **mask)
    o = res[0] if isinstance(res, (list, tuple)) else res
    o.set_output(True).set_dim([B, N, sq, H]).set_stride(q_stride)
    if ragged:
        o.set_ragged_offset(rag)
    try:
        g.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    except Exception as exc:
        if type(exc).__name__ == "cudnnGraphNotSupportedError":
            raise _unsupported(f"cudnn-paged: {str(exc).splitlines()[0][:300]}") from None
        raise
    workspace = torch.empty(max(1, int(g.get_workspace_size())), dtype=torch.uint8, device=dev)
    handle = cudnn.create_handle()

    def i32t(a):
        return torch.as_tensor(np.asarray(a), dtype=torch.int32, device=dev)

    fixed = {seq_q: i32t(case.q_lens).view(B, 1, 1, 1),
             seq_kv: i32t(kv_lens).view(B, 1, 1, 1), pt_k: i32t(table), pt_v: i32t(table)}
    if ragged:
        fixed[rag] = i32t(np.asarray(meta.cumulative_sequence_length, np.int64) * N * H).view(
            B + 1, 1, 1, 1)
    packs = []
    for s in sets:
        out = torch.empty(T, N * H, dtype=dt, device=dev)
        qd = s.q if ragged else s.q.as_strided((B, N, sq, H), q_stride)
        # the keys are cudnn tensor handles, not strings: merge, never **-expand
        packs.append({**fixed, q: qd, k: s.kc.permute(0, 2, 1, 3),
                      v: s.vc.permute(0, 2, 1, 3), o: out})
    outs = [p[o] for p in packs]

    def fn(i):
        cudnn.set_stream(handle, int(torch.cuda.current_stream().cuda_stream))
        g.execute(packs[i], workspace, handle=handle)
        return outs[i]

    cum = meta.cumulative_sequence_length

    def row(outputs, b, j):
        return outputs[int(cum[b]) + j].view(N, H)

    notes = [f"cudnn backend {cudnn.backend_version()}, frontend "
             f"{getattr(cudnn, '__version__', '?')}: pygraph sdpa with page tables "
             f"(B,1,{mp},1), containers (blocks,Nkv,bs,H) strided over our caches",
             "padding mask + seq_len_q/kv; " + ("bottom-right causal" if causal else
                                               "no causal mask (q_len 1)")
             + ("; Q/O ragged offsets (THD)" if ragged else "; Q/O BSHD strides"),
             "graph built untimed, execute() timed", NO_WRITE_NOTE]
    return P.Impl(CUDNN_PEER, "peer", fn, row, notes)
