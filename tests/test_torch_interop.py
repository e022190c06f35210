"""torch CUDA tensors in, torch tensors out: zero-copy, caches updated in place, torch's stream."""
import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _inputs(torch, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    T, N, Nkv, H, bs = 22, 8, 2, 64, 16

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    args = (rnd(T, N * H), rnd(T, Nkv * H), rnd(T, Nkv * H),
            rnd(12, bs, Nkv, H), rnd(12, bs, Nkv, H),
            torch.tensor([0, 5, 21, 22], dtype=torch.int32, device="cuda"),
            torch.tensor([11, 0, 40], dtype=torch.int32, device="cuda"),
            torch.tensor([[3, -1, -1], [7, 1, -1], [0, 2, 9]], dtype=torch.int32,
                         device="cuda"))
    return args, dict(num_heads=N, kv_num_heads=Nkv)


@pytest.mark.parametrize("backend", ["flash", "mea"])
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_torch_tensors_round_trip_zero_copy(backend, dtype_name):
    torch = pytest.importorskip("torch")
    import cupy

    import cupy_paged

    dtype = getattr(torch, dtype_name)
    args, kw = _inputs(torch, dtype)
    kc, vc = args[3], args[4]
    cache_ptrs = (kc.data_ptr(), vc.data_ptr())
    # The same call through CuPy views of copies is the expected result.
    copies = [cupy.from_dlpack(a.clone()) for a in args]
    expected = cupy_paged.paged_attention(*copies, **kw, backend=backend)

    got = cupy_paged.paged_attention(*args, **kw, backend=backend)
    assert isinstance(got, torch.Tensor) and got.dtype == dtype and got.is_cuda
    assert got.shape == (22, 8 * 64)
    assert torch.equal(got, torch.from_dlpack(expected))
    assert (kc.data_ptr(), vc.data_ptr()) == cache_ptrs
    assert torch.equal(kc, torch.from_dlpack(copies[3])), "key cache not updated in place"
    assert torch.equal(vc, torch.from_dlpack(copies[4])), "value cache not updated in place"

    out = torch.full_like(got, float("nan"))
    same = cupy_paged.paged_attention(*args, **kw, backend=backend, out=out)
    assert same is out and torch.equal(out, got)


def test_runs_on_torchs_current_stream(monkeypatch):
    torch = pytest.importorskip("torch")
    import cupy

    import cupy_paged
    from cupy_paged.backends._flash_kernels import ForwardStep

    seen = []
    launch = ForwardStep.__call__

    def recording_launch(*a, **k):
        seen.append(cupy.cuda.get_current_stream().ptr)
        return launch(*a, **k)

    monkeypatch.setattr(ForwardStep, "__call__", recording_launch)
    args, kw = _inputs(torch, torch.float16, seed=3)
    expected = cupy_paged.paged_attention(*[a.clone() for a in args], **kw, backend="flash")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        q = args[0] * 1.0                       # produced on the side stream
        out = cupy_paged.paged_attention(q, *args[1:], **kw, backend="flash")
        result = out * 1.0                      # consumed on the side stream, no sync between
    torch.cuda.current_stream().wait_stream(side)
    assert seen[-1] == side.cuda_stream
    assert torch.equal(result, expected)
    assert np.isfinite(result.float().cpu().numpy()).all()
