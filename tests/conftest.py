"""Shared test setup: the `gpu` marker skips cleanly on machines without a CUDA GPU; a
private kernel cache per module (`cache_dir`)."""
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


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private compile cache for one test module (CPU compiles and GPU loads alike), also in
    os.environ. Modules that compile take it with ``pytestmark = pytest.mark.usefixtures(
    "cache_dir")`` or as an argument."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cupy_paged_cache")
        mp.setenv("CUPY_PAGED_CACHE_DIR", str(path))
        yield path
