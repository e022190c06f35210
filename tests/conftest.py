"""Shared test setup: the `gpu` marker skips cleanly on machines without a CUDA GPU."""
import functools

import pytest


@functools.lru_cache(maxsize=1)
def gpu_available():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
