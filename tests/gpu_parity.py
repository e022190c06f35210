"""GPU backend vs the NumPy reference on one test case (used by every GPU parity test).

The case's inputs are drawn in float32, rounded once to the GPU dtype (fp16 / bf16) on the
host; the reference runs on float32 copies of those rounded values. The GPU output is poisoned
with NaN before the call. Checked: ||out - ref|| / ||ref|| within the dtype's budget, unwritten
cache slots bit-identical, written V slots bit-exact, written K slots within rounding.
"""
import dataclasses

import numpy as np

from cupy_paged.reference import paged_attention_reference

try:
    from .paged_cases import bits, make_inputs, rel_err, written_slots
except ImportError:
    from paged_cases import bits, make_inputs, rel_err, written_slots

# Relative error budget of the output against the float32 reference (issue 3).
OUT_TOL = {"float16": 2e-3, "bfloat16": 1.6e-2}
# Rotated K is computed: one rounding of the GPU dtype plus float32 noise.
K_RTOL = {"float16": 2e-3, "bfloat16": 1.6e-2}


def host_dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def check_backend(case, rng, backend, gpu_dtype, **call_kwargs):
    """Run ``case`` on ``backend`` in ``gpu_dtype`` and compare with the reference."""
    import cupy
    import cupy_paged

    inp = make_inputs(dataclasses.replace(case, dtype="float32"), rng)
    lowp = host_dtype(gpu_dtype)
    low = [None if x is None or x.dtype.kind != "f" else x.astype(lowp) for x in inp.args]
    host = [x if low[i] is None else low[i].astype(np.float32)
            for i, x in enumerate(inp.args)]
    dev = [None if x is None else cupy.asarray(low[i] if low[i] is not None else x)
           for i, x in enumerate(inp.args)]

    ref_kw, dev_kw = dict(inp.kwargs), dict(inp.kwargs)
    if inp.kwargs.get("head_sink") is not None:       # rounded like the other inputs
        sink = inp.kwargs["head_sink"].astype(lowp)
        ref_kw["head_sink"], dev_kw["head_sink"] = sink.astype(np.float32), cupy.asarray(sink)
    ref_kc, ref_vc = host[3].copy(), host[4].copy()
    ref = paged_attention_reference(*host[:3], ref_kc, ref_vc, *host[5:], **ref_kw)

    T, N, H = host[0].shape[0], inp.kwargs["num_heads"], host[3].shape[3]
    out = cupy.full((T, N * H), np.nan, dtype=lowp)
    got = cupy_paged.paged_attention(*dev, **dev_kw, backend=backend, out=out,
                                     **call_kwargs)
    assert got is out
    tag = f"{case.name} [{gpu_dtype}, {backend}]"
    got = cupy.asnumpy(got).astype(np.float32)
    assert np.isfinite(got).all(), f"{tag}: output has NaN/inf (unwritten rows?)"
    err = rel_err(got, ref)
    assert err <= OUT_TOL[gpu_dtype], f"{tag}: relative error {err:.3e} > {OUT_TOL[gpu_dtype]}"

    mask = written_slots(inp)
    for name, d, orig, want in (("key_cache", dev[3], low[3], ref_kc),
                                ("value_cache", dev[4], low[4], ref_vc)):
        d = cupy.asnumpy(d)
        untouched = (bits(d[~mask]) == bits(orig[~mask])).all()
        assert untouched, f"{tag}: {name} changed outside the written slots"
        if name == "value_cache" or not inp.kwargs["do_rotary"]:
            exact = (bits(d[mask]) == bits(want[mask].astype(lowp))).all()
            assert exact, f"{tag}: {name} written slots differ from the new tokens"
        else:
            close = np.allclose(d[mask].astype(np.float32), want[mask],
                                rtol=K_RTOL[gpu_dtype], atol=K_RTOL[gpu_dtype])
            assert close, f"{tag}: rotated K in the cache differs from the reference"
    return err
