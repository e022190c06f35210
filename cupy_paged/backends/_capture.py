"""Calls captured into a CUDA graph: their allocations must outlive the call.

A backend allocates per-call scratch (the rotated query, mea's gathered K/V and prefix sums,
CuPy's own scan buffers). Outside a capture that memory goes back to CuPy's pool when the call
returns. Inside one, the graph keeps using those addresses on every replay, so a later
allocation that reuses them would race with the replay. While the current stream captures,
``keep_allocations`` routes the call's allocations through the active allocator and keeps every
block for the life of the process (a graph is captured once and replayed many times, so the
memory kept is bounded by the captures made). It also spares CUDA a free inside the capture.
"""
from __future__ import annotations

import contextlib
import threading

_kept: list = []        # memory of calls made during a capture, never released
_lock = threading.Lock()
_NOTHING = contextlib.nullcontext()


def keep_allocations(xp, stream=None):
    """A context for the call's GPU work: a no-op unless ``stream`` (None: the current CuPy
    stream) is capturing; then every allocation inside it is kept alive (see the module
    docstring). The legacy default stream (handle 0) cannot capture and is not queried."""
    stream = xp.cuda.get_current_stream() if stream is None else stream
    if stream.ptr == 0 or not stream.is_capturing():
        return _NOTHING
    return _keeping(xp)


@contextlib.contextmanager
def _keeping(xp):
    previous = xp.cuda.get_allocator()

    def allocate(size):
        memory = previous(size)
        with _lock:
            _kept.append(memory)
        return memory

    with xp.cuda.using_allocator(allocate):
        yield


def kept_bytes():
    """Bytes held for captured calls so far."""
    with _lock:
        return sum(m.mem.size for m in _kept)
