"""backends/_capture.keep_allocations on the host, with a stand-in for CuPy's stream and
allocator API: outside a capture it changes nothing; inside one every allocation made in the
context is kept alive after it, through whatever allocator was active. CPU only (the GPU
behaviour is tests/test_capture_gpu.py)."""
from __future__ import annotations

import contextlib
import types

from cupy_paged.backends import _capture


class _Memory:
    def __init__(self, size):
        self.mem = types.SimpleNamespace(size=size)


def _fake_xp(capturing, stream_ptr=5):
    state = {"allocator": lambda size: _Memory(size)}

    @contextlib.contextmanager
    def using_allocator(allocator):
        previous, state["allocator"] = state["allocator"], allocator
        try:
            yield
        finally:
            state["allocator"] = previous

    stream = types.SimpleNamespace(ptr=stream_ptr, is_capturing=lambda: capturing)
    cuda = types.SimpleNamespace(get_current_stream=lambda: stream,
                                 get_allocator=lambda: state["allocator"],
                                 using_allocator=using_allocator)
    return types.SimpleNamespace(cuda=cuda), state


def test_outside_a_capture_nothing_is_kept(monkeypatch):
    monkeypatch.setattr(_capture, "_kept", [])
    xp, state = _fake_xp(capturing=False)
    with _capture.keep_allocations(xp):
        state["allocator"](100)
    assert _capture.kept_bytes() == 0


def test_the_legacy_stream_is_never_queried(monkeypatch):
    monkeypatch.setattr(_capture, "_kept", [])
    xp, _ = _fake_xp(capturing=True, stream_ptr=0)   # would say "capturing" if asked
    assert _capture.keep_allocations(xp) is _capture._NOTHING


def test_inside_a_capture_every_allocation_is_kept(monkeypatch):
    monkeypatch.setattr(_capture, "_kept", [])
    xp, state = _fake_xp(capturing=True)
    original = state["allocator"]
    with _capture.keep_allocations(xp):
        a, b = state["allocator"](256), state["allocator"](1024)
    assert state["allocator"] is original                # the caller's allocator is back
    assert _capture._kept == [a, b] and _capture.kept_bytes() == 1280
    state["allocator"](64)                               # after the call: not kept
    assert _capture.kept_bytes() == 1280
