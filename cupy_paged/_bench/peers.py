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

This module: the inputs, the float32 reference and the row check, our backends' builders, and
the state callers set or share (DEVICE, the compiled-flex cache _FLEX). The torch peers'
builders (build_sdpa, drop_dense, build_flex) live in peers_torch.py and are re-exported here,
so ``peers.<name>`` reaches every builder; they read DEVICE and _FLEX from this module at call
time, so setting ``peers.DEVICE`` applies to them too.
"""
from __future__ import annotations

import dataclasses
import inspect
import math

import numpy as np
import torch

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
    ref: object = None        # its own reference rows (e.g. with a head sink), else the run's


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


def reference_rows(case, meta, s, rows, sink=None):
    """{(b, j): (N, H) float32} recomputed from the paged cache of input set s; sink: None,
    or (N,) float32 logits that join each row's softmax denominator (a head sink)."""
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
        logits = torch.einsum("nh,knh->nk", q, K) * scale
        if sink is not None:                   # one more column, dropped after the softmax
            logits = torch.cat([logits, sink.to(logits.device)[:, None]], dim=1)
        w = torch.softmax(logits, dim=-1)[:, :K.shape[0]]
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
def build_ours(backend, case, meta, sets, options=None, sink=False, kernel=None):
    """cupy_paged.paged_attention(..., backend=backend) on CuPy views of the torch tensors.

    Timed as the user calls it: validation of shapes on the host, the prologue (new K/V
    written into the caches; no rotary here) and the attention. out= is preallocated.
    options: a ``cupy_paged.PlanOptions`` (tile, split count, launch mode), or None.
    sink: pass a head_sink (N logits drawn once, seed 0) and check against a sink reference;
    the row is named "ours:<backend>+sink". kernel: flash's kernel family ("sm80"), the row
    "ours:<backend>-<kernel>".
    """
    if kernel is not None:
        import dataclasses

        import cupy_paged as cpg
        options = dataclasses.replace(options or cpg.PlanOptions(), kernel=kernel)
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
    sink_logits = None
    if sink:
        sink_logits = torch.as_tensor(np.random.default_rng(0).standard_normal(case.num_heads),
                                      dtype=torch.float32)
        hints["head_sink"] = cupy.asarray(sink_logits.to(DTYPES[case.dtype]).to(DEVICE))

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
            f"{k}={v}" for k, v in hints.items() if k not in ("options", "head_sink")))
    name = f"ours:{backend}" + (f"-{kernel}" if kernel else "")
    if not sink:
        return Impl(name, "ours", fn, row, notes)
    notes.append("with a head_sink of N logits (standard normal, seed 0)")
    rounded = sink_logits.to(DTYPES[case.dtype]).float()      # what the kernel reads
    ref = reference_rows(case, meta, sets[0], C.sample_rows(case), sink=rounded)
    return Impl(f"ours:{backend}+sink", "ours", fn, row, notes, ref=ref)


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


# --- torch peers (peers_torch.py), re-exported; their state stays here ---------------------
_FLEX = {}     # the compiled flex_attention, shared by every build_flex

# imported last: peers_torch reads Impl, _sync, DEVICE and _FLEX from this module
from .peers_torch import _attend, _gather, _group_views, _mask_kind  # noqa: E402, F401
from .peers_torch import _compiled_flex, build_flex, build_sdpa, drop_dense  # noqa: E402, F401
