"""The flash backend with programmatic launches forced on for every call (the plan option
``PlanOptions(programmatic=True)``): the prologue, forward kernel and combine then start behind
one another on sm90+ (cuda_src/common/pdl.cuh), which the default threshold keeps for large
calls only. On older GPUs the same calls run with plain launches."""
import zlib

import numpy as np
import pytest

try:
    from .gpu_parity import check_backend
    from .test_backends_gpu import EDGE_CASES, _matrix
except ImportError:
    from gpu_parity import check_backend
    from test_backends_gpu import EDGE_CASES, _matrix


def _always():
    from cupy_paged import PlanOptions

    return PlanOptions(programmatic=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", _matrix()[::3] + EDGE_CASES, ids=lambda c: c.name)
def test_flash_with_programmatic_launches_matches_reference(case):
    import cupy

    from cupy_paged import backends
    from cupy_paged.backends._launch import programmatic_supported

    rng = np.random.default_rng(zlib.crc32(f"pdl-{case.name}".encode()))
    check_backend(case, rng, "flash", "float16", options=_always())
    device = cupy.cuda.Device().id
    plans = [p for _, p in backends._PLANS.values() if p.options == _always()]
    assert plans and all(p.details["programmatic"] == programmatic_supported(device)
                         for p in plans)


@pytest.mark.gpu
def test_decode_steps_with_programmatic_launches_see_each_others_keys():
    """Call i + 1 reads the keys call i wrote (a decode loop): with programmatic launches the
    next call's guard still starts only after the previous call's last kernel completes."""
    import cupy

    import cupy_paged

    rng = np.random.default_rng(5)
    B, N, Nkv, H, bs, steps, past0 = 4, 8, 2, 64, 16, 6, 40
    blocks_per_seq = -(-(past0 + steps) // bs)
    kc = rng.standard_normal((B * blocks_per_seq, bs, Nkv, H)).astype(np.float16)
    vc = rng.standard_normal(kc.shape).astype(np.float16)
    table = rng.permutation(B * blocks_per_seq).reshape(B, -1).astype(np.int32)
    q = rng.standard_normal((steps, B, N * H)).astype(np.float16)
    k = rng.standard_normal((steps, B, Nkv * H)).astype(np.float16)
    v = rng.standard_normal((steps, B, Nkv * H)).astype(np.float16)
    cum = np.arange(B + 1, dtype=np.int32)
    d_kc, d_vc, d_table, d_cum = map(cupy.asarray, (kc, vc, table, cum))
    outs = []
    for i in range(steps):                    # queued back to back, no host sync between
        past = cupy.full(B, past0 + i, dtype=cupy.int32)
        outs.append(cupy_paged.paged_attention(
            cupy.asarray(q[i]), cupy.asarray(k[i]), cupy.asarray(v[i]), d_kc, d_vc, d_cum,
            past, d_table, num_heads=N, kv_num_heads=Nkv, backend="flash",
            options=_always()))
    ref_kc, ref_vc = kc.astype(np.float32), vc.astype(np.float32)
    for i in range(steps):
        ref = cupy_paged.paged_attention(
            q[i].astype(np.float32), k[i].astype(np.float32), v[i].astype(np.float32), ref_kc,
            ref_vc, cum, np.full(B, past0 + i, dtype=np.int32), table, num_heads=N,
            kv_num_heads=Nkv)
        got = cupy.asnumpy(outs[i]).astype(np.float32)
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < 2e-2, f"step {i}: relative error {err:.2e}"
    assert np.array_equal(cupy.asnumpy(d_kc).astype(np.float32), ref_kc.astype(np.float16)
                          .astype(np.float32))
