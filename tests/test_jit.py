"""The NVRTC toolchain: discovery, compile, disk cache, locking, parallel builds, CUTLASS fMHA.

Everything but the `gpu`-marked test runs on a CPU-only machine (NVRTC needs no GPU). Every test
uses a fresh cache dir under tmp_path, never the user's.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy
import pytest

from cupy_paged.errors import CompileError, ToolchainError
from cupy_paged.jit import (
    KernelSpec,
    cache,
    clear_toolchain_cache,
    compile_many,
    compile_variant,
    compiler,
    find_toolchain,
    get_spec,
    normalize_arch,
    register,
    toolchain,
)

REPO = Path(__file__).resolve().parents[1]
SMOKE_ARCHS = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90"]
ELF_MAGIC = b"\x7fELF"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("CUPY_PAGED_CACHE_DIR", str(path))
    return path


@pytest.fixture
def source_copy(tmp_path, monkeypatch):
    """A private copy of cuda_src that the toolchain compiles from."""
    dst = tmp_path / "cuda_src"
    shutil.copytree(find_toolchain().source_dir, dst)
    monkeypatch.setenv("CUPY_PAGED_SOURCE_DIR", str(dst))
    return dst


@pytest.fixture
def fresh_toolchain():
    """Forget found toolchains before and after a test that monkeypatches discovery."""
    clear_toolchain_cache()
    yield
    clear_toolchain_cache()


def assert_valid_cubin(result, symbol=None):
    data = result.path.read_bytes()
    assert data[:4] == ELF_MAGIC, f"{result.path} is not an ELF cubin"
    assert (symbol or result.name).encode() in data, "extern \"C\" entry missing from the cubin"
    meta = json.loads(result.path.with_suffix(".json").read_text())
    assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["size"] == len(data)


def entry_for(name, arch):
    spec, tc = get_spec(name), find_toolchain()
    options = compiler.build_options(spec, arch, tc)
    key = compiler.cache_key(spec, arch, tc, compiler.program_source(spec), options)
    return cache.Entry.of(name, arch, key)


# ---------------------------------------------------------------- discovery


def test_package_imports_without_cupy():
    code = ("import sys, cupy_paged.jit; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('cupy', 'cupy_backends')]")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_include_path_order():
    tc = find_toolchain()
    dirs = tc.include_dirs(cutlass=True)
    assert dirs[0] == tc.shim_dir and (dirs[0] / "cmath").is_file()
    assert dirs[1] == tc.source_dir
    assert (tc.headers.cuda_include / "cuda_fp16.h").is_file()
    assert (tc.headers.cccl_include / "cuda" / "std" / "type_traits").is_file()
    assert (tc.headers.crt_include / "crt" / "host_defines.h").is_file()
    assert dirs[-2:] == (tc.cutlass_include, tc.fmha_example)
    assert (dirs[-1] / "kernel_forward.h").is_file()
    assert dirs.index(tc.headers.cuda_include) < dirs.index(tc.cutlass_include)
    assert tc.headers.cuda_version // 1000 == tc.nvrtc_version[0]


def fake_toolkit(root, version, cccl_subdir):
    inc = root / "include"
    cccl = inc / "cccl" if cccl_subdir else inc
    (cccl / "cuda" / "std").mkdir(parents=True)
    (inc / "crt").mkdir(parents=True)
    (inc / "crt" / "host_defines.h").write_text("")
    (inc / "cuda_fp16.h").write_text("")
    (inc / "cuda.h").write_text(f"#define CUDA_VERSION {version}\n")
    return root


def test_headers_matching_nvrtc_major_are_preferred(tmp_path):
    cuda13 = fake_toolkit(tmp_path / "cuda-13.0", 13000, cccl_subdir=True)
    cuda12 = fake_toolkit(tmp_path / "cuda-12.8", 12080, cccl_subdir=False)
    h = toolchain._pick_headers(13, [str(cuda12), str(cuda13)])
    assert h.cuda_version == 13000 and h.cccl_include == (cuda13 / "include" / "cccl").resolve()
    h = toolchain._pick_headers(12, [str(cuda13), str(cuda12)])
    assert h.cuda_version == 12080 and h.cccl_include == (cuda12 / "include").resolve()


def test_missing_cuda_headers_name_the_packages(monkeypatch):
    monkeypatch.setattr(toolchain, "_nvidia_dirs", list)
    with pytest.raises(ToolchainError, match="pip install nvidia-cuda-runtime-cu12"):
        toolchain._pick_headers(12, ["/nonexistent"])


def test_missing_cutlass_raises_toolchain_error(monkeypatch, fresh_toolchain):
    monkeypatch.delenv("CUTLASS_PATH", raising=False)
    monkeypatch.setattr(toolchain, "_cutlass_package_roots", list)
    with pytest.raises(ToolchainError, match="pip install nvidia-cutlass"):
        compile_variant("mea_probe_fmha_f16_sm80_q64_k64", "sm_80")
    assert_valid_cubin(compile_variant("smoke_axpy_f32", "sm_80"))  # smoke needs no CUTLASS


def test_bad_cutlass_path_is_named(monkeypatch, tmp_path, fresh_toolchain):
    monkeypatch.setenv("CUTLASS_PATH", str(tmp_path))
    with pytest.raises(ToolchainError, match="CUTLASS_PATH="):
        compile_variant("mea_probe_fmha_f16_sm80_q64_k64", "sm_80")


# ---------------------------------------------------------------- registry


def test_spec_rules():
    with pytest.raises(ValueError, match="C identifier"):
        KernelSpec("smoke-axpy", "smoke/axpy.cu", "")
    with pytest.raises(ValueError, match="already registered"):
        register(KernelSpec("smoke_axpy_f32", "smoke/axpy.cu", "// another body"))
    with pytest.raises(KeyError, match="smoke_axpy_f32"):
        get_spec("no_such_kernel")
    with pytest.raises(ValueError, match="needs sm_80 or newer"):
        compile_variant("mea_probe_fmha_f16_sm80_q64_k64", "sm_75")
    assert KernelSpec("k", "s.cu", "", defines={"B": 2, "A": 1}).defines == (("A", "1"), ("B", "2"))


@pytest.mark.parametrize("given,expected", [(80, "sm_80"), ("86", "sm_86"), ("sm_90", "sm_90"),
                                            ("SM_90a", "sm_90a"), ("sm_100f", "sm_100f")])
def test_arch_names(given, expected):
    assert normalize_arch(given) == expected


def test_arch_name_that_is_not_an_sm_is_refused():
    with pytest.raises(ValueError, match="not an SM name"):
        normalize_arch("compute_80")  # cubins are SASS for one SM; PTX targets are not built


# ---------------------------------------------------------------- compile and cache


@pytest.mark.parametrize("arch", SMOKE_ARCHS)
def test_smoke_compiles_for_arch(arch):
    from cupy_backends.cuda.libs import nvrtc

    if int(arch[3:]) not in nvrtc.getSupportedArchs():  # NVRTC 13 dropped sm_70
        with pytest.raises(ToolchainError, match=f"cannot build {arch}"):
            compile_variant("smoke_axpy_f32", arch)
        return
    for name in ("smoke_axpy_f16", "smoke_axpy_f32"):
        result = compile_variant(name, arch)
        assert not result.cached and result.arch == arch
        assert result.path.name.startswith(f"{name}-{arch}-")
        assert_valid_cubin(result)


def test_second_compile_is_a_cache_hit():
    first = compile_variant("smoke_axpy_f32", "sm_80")
    start = time.perf_counter()
    second = compile_variant("smoke_axpy_f32", "sm_80")
    elapsed = time.perf_counter() - start
    assert not first.cached and second.cached and second.path == first.path
    assert elapsed < 0.5, f"cache hit took {elapsed:.2f} s"


def test_editing_any_source_file_changes_the_key(source_copy):
    first = compile_variant("smoke_axpy_f32", "sm_80")
    axpy = source_copy / "smoke" / "axpy.cu"
    axpy.write_text(axpy.read_text() + "\n// edited\n")
    second = compile_variant("smoke_axpy_f32", "sm_80")
    assert not second.cached and second.path != first.path
    # a header the kernel does not include still counts: the key covers all of cuda_src
    (source_copy / "smoke" / "unused.cuh").write_text("// new header\n")
    third = compile_variant("smoke_axpy_f32", "sm_80")
    assert not third.cached and third.path not in (first.path, second.path)


@pytest.mark.parametrize("damage", ["truncated", "flipped_byte", "missing_json"])
def test_corrupted_cache_entry_is_rebuilt(damage):
    first = compile_variant("smoke_axpy_f32", "sm_80")
    data = first.path.read_bytes()
    if damage == "truncated":
        first.path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped_byte":
        first.path.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        first.path.with_suffix(".json").unlink()
    again = compile_variant("smoke_axpy_f32", "sm_80")
    assert not again.cached and again.path == first.path
    assert again.path.read_bytes() == data
    assert_valid_cubin(again)


def test_syntax_error_raises_compile_error_with_log(source_copy, cache_dir):
    (source_copy / "smoke" / "broken.cu").write_text(
        "// broken on purpose\n__device__ int broken_add(int a) { return a + }\n")
    spec = KernelSpec("smoke_broken_f32", "smoke/broken.cu",
                      'extern "C" __global__ void smoke_broken_f32(int* x) { *x = broken_add(*x); }\n')
    with pytest.raises(CompileError) as info:
        compile_variant(spec, "sm_80")
    message = str(info.value)
    assert "smoke_broken_f32" in message and "sm_80" in message
    assert "broken.cu(2): error" in message, message  # NVRTC's own log line
    assert not list(cache_dir.glob("*.cubin"))


def test_concurrent_processes_compile_once(cache_dir):
    """Two processes ask for one variant while its lock is held: exactly one compiles."""
    script = textwrap.dedent("""
        import json, logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        from cupy_paged.jit import compile_variant
        r = compile_variant("smoke_axpy_f16", "sm_86")
        print(json.dumps({"cached": r.cached, "path": str(r.path)}))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with cache.locked(entry_for("smoke_axpy_f16", "sm_86")):
        procs = [subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(2)]
        time.sleep(1.5)  # both reach the lock (import takes ~0.5 s); holding it lines them up
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [json.loads(out) for out, _ in outs]
    assert sorted(r["cached"] for r in results) == [False, True]
    assert sum(err.count("compiling smoke_axpy_f16") for _, err in outs) == 1
    assert len({r["path"] for r in results}) == 1
    assert [p.name for p in cache_dir.iterdir() if p.suffix == ".cubin"] == [
        Path(results[0]["path"]).name]
    assert not list(cache_dir.glob("*.tmp"))


def test_compile_many_in_parallel(cache_dir):
    items = [(name, arch) for arch in ("sm_75", "sm_80", "sm_90")
             for name in ("smoke_axpy_f16", "smoke_axpy_f32")]
    results = compile_many(items, jobs=2)
    assert [(r.name, r.arch) for r in results] == items
    assert not any(r.cached for r in results) and all(r.seconds > 0 for r in results)
    for r in results:
        assert r.path.parent == cache_dir  # the spawned workers saw this test's cache dir
        assert_valid_cubin(r)
    assert all(r.cached for r in compile_many(items, jobs=2))


# ---------------------------------------------------------------- CUTLASS fMHA through NVRTC


@pytest.mark.parametrize("name,arch", [
    ("mea_probe_fmha_f16_sm75_q64_k64", "sm_75"),
    ("mea_probe_fmha_f16_sm80_q64_k64", "sm_80"),
])
def test_mea_cutlass_fmha_compiles(name, arch):
    result = compile_variant(name, arch)
    print(f"\n{name} for {arch}: {result.seconds:.1f} s")
    assert not result.cached
    assert_valid_cubin(result)


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name,dtype", [("smoke_axpy_f32", numpy.float32),
                                        ("smoke_axpy_f16", numpy.float16)])
def test_loader_runs_smoke_kernel(name, dtype):
    import cupy

    from cupy_paged.jit import get_function, loader

    n, a = 1000, 2.5  # n not a multiple of the block: the tail must be handled
    rng = numpy.random.default_rng(0)
    x_h, y_h = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    x, y = cupy.asarray(x_h), cupy.asarray(y_h)
    kernel = get_function(name)
    get_function(name)
    assert sum(key[1] == name for key in loader._modules) == 1  # one module, reused
    kernel((4,), (128,), (numpy.int32(n), numpy.float32(a), x, y))
    expected = (a * x_h.astype(numpy.float32) + y_h.astype(numpy.float32)).astype(dtype)
    # the kernel may fuse a*x+y (one rounding); fp16 then rounds once more: one ulp each
    tol = 1e-6 if dtype == numpy.float32 else 2.0 ** -10
    numpy.testing.assert_allclose(cupy.asnumpy(y).astype(numpy.float32),
                                  expected.astype(numpy.float32), rtol=tol, atol=tol)
