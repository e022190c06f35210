"""A call captured into a CUDA graph keeps its per-call scratch for the graph's lifetime.

Outside a capture a call's scratch (the rotated query, mea's gathered K/V and prefix sums,
CuPy's scan buffers) goes back to CuPy's pool when it returns. A captured graph keeps writing
those addresses on every replay, so arrays the user allocates after the capture must never be
handed that memory: here they are filled with a sentinel, the graph is replayed, and they must
still hold it, while the replay's output equals the eager call's bit for bit.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import cupy_paged

try:
    from .paged_cases import Case, make_inputs
except ImportError:  # run as a plain test directory
    from paged_cases import Case, make_inputs

pytestmark = pytest.mark.gpu

# rotary + packed makes the prologue write a scratch query; mixed lengths exercise mea's gather
CASES = {
    "rotary_packed": Case("capture_rotary_packed", lens=((5, 30), (1, 77), (17, 0)), N=8,
                          Nkv=2, H=64, bs=16, packed=True, rotary="neox"),
    "rotary_split": Case("capture_rotary_split", lens=((1, 3000), (1, 1500)), N=8, Nkv=2,
                         H=128, bs=16, rotary="gptj"),
}


@pytest.mark.parametrize("backend", ["flash", "mea"])
@pytest.mark.parametrize("name", list(CASES))
def test_captured_call_keeps_its_scratch(backend, name):
    import cupy

    from cupy_paged.backends import _capture

    rng = np.random.default_rng(7)
    inp = make_inputs(dataclasses.replace(CASES[name], dtype="float16"), rng)
    host = inp.args
    dev = [None if x is None else cupy.asarray(x) for x in host]
    T, width = host[0].shape[0], inp.kwargs["num_heads"] * host[3].shape[3]
    # host-side bounds: mea sizes its scratch from them instead of a sync (illegal in a capture)
    lens = [q + p for q, p in zip(inp.q_lens, inp.pasts)]
    kwargs = dict(inp.kwargs, backend=backend, max_seqlen_q=max(inp.q_lens),
                  max_seqlen_k=max(lens), total_kv_tokens=sum(lens))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        eager = cupy_paged.paged_attention(*dev, **kwargs)
        out = cupy.full((T, width), np.nan, dtype=cupy.float16)
        for i in (3, 4):                      # the caches again as before the call
            dev[i][...] = cupy.asarray(host[i])
        kept = _capture.kept_bytes()
        stream.begin_capture()
        try:
            cupy_paged.paged_attention(*dev, **kwargs, out=out)
        finally:                              # never leave the stream capturing
            graph = stream.end_capture()
        assert _capture.kept_bytes() > kept   # rotary: at least the rotated query is kept
        # the user's next arrays: in a pool that got the call's scratch back, these reuse it
        sentinels = [cupy.full(n, 12345, dtype=cupy.int32) for n in _sizes(inp) for _ in "ab"]
        for i in (3, 4):
            dev[i][...] = cupy.asarray(host[i])
        graph.launch(stream)
        stream.synchronize()
    for s in sentinels:
        assert bool((s == 12345).all()), "the graph's replay wrote into memory it gave back"
    assert bool(cupy.array_equal(out, eager)), "replay differs from the eager call"


def _sizes(inp):
    """int32 element counts covering each scratch size the call may have allocated."""
    q = inp.args[0]
    kv_rows = sum(q + p for q, p in zip(inp.q_lens, inp.pasts))
    kv = kv_rows * inp.args[3].shape[2] * inp.args[3].shape[3]
    return sorted({q.shape[0] * inp.kwargs["num_heads"] * inp.args[3].shape[3] // 2,
                   kv // 2, len(inp.q_lens) + 1, 4 * q.size})
