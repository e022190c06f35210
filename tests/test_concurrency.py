"""The kernel cache under concurrency and damage (CPU: NVRTC needs no GPU).

tests/test_jit.py already covers two subprocesses that queue on a lock the test holds, and a
truncated / byte-flipped / json-less entry being rebuilt. Here: threads of one process and
spawned processes released together (no lock held by the test) on a fresh
CUPY_PAGED_CACHE_DIR compile a variant exactly once (NVRTC calls counted by wrapping
``compiler._nvrtc_compile``) and leave one whole entry; a process killed while compiling (lock
held) neither blocks nor corrupts the next compile; a damaged entry is reported, never returned
by ``cached_variant`` (what a loader would load), and rebuilt by exactly one compile.
"""
import hashlib
import json
import logging
import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from cupy_paged.jit import KernelSpec, cache, compile_variant, compiler, find_toolchain

ELF_MAGIC = b"\x7fELF"
ARCH = "sm_80"


def private_spec(name):
    """A variant no other test builds (the smoke axpy source under its own name)."""
    entry = (f'extern "C" __global__ void {name}(int n, float a, const float* x, float* y) {{\n'
             f"  cupy_paged::smoke::axpy<float>(n, a, x, y);\n}}\n")
    return KernelSpec(name, "smoke/axpy.cu", entry)


def entry_of(spec, arch=ARCH):
    tc = find_toolchain()
    return compiler._cache_entry(spec, arch, tc)[0]


def assert_one_whole_entry(cache_dir, spec):
    """Exactly one cubin + json for ``spec``, matching each other; no temp files left."""
    entry = entry_of(spec)
    cubins = sorted(p.name for p in Path(cache_dir).glob(f"{spec.name}-*.cubin"))
    assert cubins == [entry.cubin.name], cubins
    data = entry.cubin.read_bytes()
    meta = json.loads(entry.meta.read_text())
    assert data[:4] == ELF_MAGIC and spec.name.encode() in data
    assert meta["size"] == len(data) and meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert cache.load(entry) is not None
    assert not list(Path(cache_dir).glob("*.tmp")), "a temporary file was left behind"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "kernel-cache"
    monkeypatch.setenv("CUPY_PAGED_CACHE_DIR", str(path))
    return path


@pytest.fixture
def nvrtc_calls(monkeypatch):
    """Counts NVRTC compiles in this process; each one takes 0.3 s longer, so that concurrent
    callers really overlap while the first one compiles."""
    calls = []
    lock = threading.Lock()
    original = compiler._nvrtc_compile

    def counted(spec, *args, **kwargs):
        with lock:
            calls.append(spec.name)
        time.sleep(0.3)
        return original(spec, *args, **kwargs)

    monkeypatch.setattr(compiler, "_nvrtc_compile", counted)
    return calls


# ---------------------------------------------------------------- threads


def test_threads_compile_once(cache_dir, nvrtc_calls):
    spec = private_spec("concurrency_threads_f32")
    n = 6
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []

    def work(i):
        try:
            barrier.wait(timeout=30)
            results[i] = compile_variant(spec, ARCH)
        except BaseException as exc:  # noqa: BLE001 (re-raised below, in the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert nvrtc_calls == [spec.name], f"NVRTC ran {len(nvrtc_calls)} times"
    assert sorted(r.cached for r in results) == [False] + [True] * (n - 1)
    assert len({r.path for r in results}) == 1
    assert_one_whole_entry(cache_dir, spec)


# ---------------------------------------------------------------- processes


def _process_worker(spec, arch, barrier, queue, hang_marker=None):
    """Spawned child: wait for the others, compile, report (cached, path, NVRTC calls here).
    With ``hang_marker``: instead write the marker and hang inside the compile (lock held)."""
    from cupy_paged.jit import compiler as child_compiler

    calls = []
    original = child_compiler._nvrtc_compile

    def counted(spec_, *args, **kwargs):
        calls.append(spec_.name)
        if hang_marker is not None:
            Path(hang_marker).write_text("compiling")
            time.sleep(600)
        time.sleep(0.3)
        return original(spec_, *args, **kwargs)

    child_compiler._nvrtc_compile = counted
    if barrier is not None:
        barrier.wait(timeout=60)
    result = child_compiler.compile_variant(spec, arch)
    queue.put((result.cached, str(result.path), len(calls)))


def test_spawned_processes_compile_once(cache_dir):
    spec = private_spec("concurrency_processes_f32")
    ctx = multiprocessing.get_context("spawn")
    n = 3
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(spec, ARCH, barrier, queue))
             for _ in range(n)]
    for p in procs:
        p.start()
    try:
        reports = [queue.get(timeout=180) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert sum(calls for _, _, calls in reports) == 1, reports
    assert sorted(cached for cached, _, _ in reports) == [False] + [True] * (n - 1)
    assert len({path for _, path, _ in reports}) == 1
    assert_one_whole_entry(cache_dir, spec)


def test_process_killed_while_compiling_leaves_no_damage(cache_dir, nvrtc_calls):
    """A child dies (SIGKILL) inside NVRTC with the entry's lock held: the lock goes with it,
    nothing half-written is ever loaded, and this process then compiles the entry once."""
    spec = private_spec("concurrency_killed_f32")
    marker = cache_dir.parent / "child-is-compiling"
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_process_worker, args=(spec, ARCH, None, queue, str(marker)))
    child.start()
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.is_alive() and time.monotonic() < deadline, "child never compiled"
            time.sleep(0.05)
        assert compiler.cached_variant(spec, ARCH) is None    # nothing usable yet
    finally:
        child.kill()
        child.join(timeout=30)
    result = compile_variant(spec, ARCH)
    assert not result.cached and nvrtc_calls == [spec.name]
    assert_one_whole_entry(cache_dir, spec)


# ---------------------------------------------------------------- damaged entries


def _damage(entry, how, other_cubin):
    data = entry.cubin.read_bytes()
    if how == "empty_cubin":
        entry.cubin.write_bytes(b"")
    elif how == "tail_cut":
        entry.cubin.write_bytes(data[:-1])
    elif how == "last_byte_flipped":
        entry.cubin.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    elif how == "foreign_cubin":            # a whole, valid cubin of another variant
        entry.cubin.write_bytes(other_cubin)
    elif how == "json_garbage":
        entry.meta.write_text("{not json")
    elif how == "json_wrong_sha":
        meta = json.loads(entry.meta.read_text())
        entry.meta.write_text(json.dumps({**meta, "sha256": "0" * 64}))
    elif how == "cubin_missing":
        entry.cubin.unlink()
    return data


@pytest.mark.parametrize("how", ["empty_cubin", "tail_cut", "last_byte_flipped",
                                 "foreign_cubin", "json_garbage", "json_wrong_sha",
                                 "cubin_missing"])
def test_damaged_entry_is_never_returned_and_rebuilt_once(how, cache_dir, caplog):
    spec = private_spec("concurrency_damaged_f32")
    other = compile_variant(private_spec("concurrency_other_f32"), ARCH).path.read_bytes()
    first = compile_variant(spec, ARCH)
    entry = entry_of(spec)
    good = _damage(entry, how, other)
    assert compiler.cached_variant(spec, ARCH) is None, "a damaged cubin was offered for loading"
    calls = []
    original = compiler._nvrtc_compile

    def counted(spec_, *args, **kwargs):
        calls.append(spec_.name)
        return original(spec_, *args, **kwargs)

    with caplog.at_level(logging.WARNING, logger="cupy_paged.jit"), \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiler, "_nvrtc_compile", counted)
        again = compile_variant(spec, ARCH)
    assert not again.cached and calls == [spec.name] and again.path == first.path
    assert again.path.read_bytes() == good
    if how in ("empty_cubin", "tail_cut", "last_byte_flipped", "foreign_cubin"):
        assert "corrupted" in caplog.text      # a mismatch is reported, not silently replaced
    assert_one_whole_entry(cache_dir, spec)
    assert compiler.cached_variant(spec, ARCH).path == first.path


def test_stale_temp_files_of_a_dead_writer_are_ignored(cache_dir):
    """A writer that died between mkstemp and os.replace leaves a .tmp file: lookups ignore it."""
    spec = private_spec("concurrency_stale_tmp_f32")
    entry = entry_of(spec)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stale = cache_dir / (entry.cubin.name + ".deadbeef.tmp")
    stale.write_bytes(ELF_MAGIC + b"half a cubin")
    result = compile_variant(spec, ARCH)
    assert not result.cached and result.path.read_bytes()[:4] == ELF_MAGIC
    assert compile_variant(spec, ARCH).cached
    stale.unlink()                               # ours; a real one would be cleaned by hand
    assert_one_whole_entry(cache_dir, spec)
