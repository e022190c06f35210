"""``python -m cupy_paged precompile`` / ``cupy_paged.precompile``, and the first-compile log line.

Runs on a CPU-only machine (NVRTC needs no GPU, ``--arch`` builds offline). The builds share
one module-wide cache directory, so the model build is compiled once and reused; the --all
build for sm_86 (34 kernels, ~30 s on 2 cores) is the slow test.
"""
import importlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cupy_paged.backends import _flash_kernels, _gather, _guard, _mea_kernels, _prologue
from cupy_paged.jit import find_toolchain
from cupy_paged._precompile import Skipped, main, needed_variants, precompile

# The module, not the function the package exports under the same name.
precompile_module = importlib.import_module("cupy_paged._precompile")
REPO = Path(__file__).resolve().parents[1]
MODEL = ["--arch", "sm_80", "--dtype", "float16", "--head-size", "128",
         "--num-heads", "32", "--kv-heads", "8"]


def _env(cache_dir, **extra):
    """The environment of a subprocess: this checkout, ``cache_dir``, no CUPY_PAGED_QUIET."""
    env = {k: v for k, v in os.environ.items() if k != "CUPY_PAGED_QUIET"}
    return {**env, "PYTHONPATH": str(REPO), "CUPY_PAGED_CACHE_DIR": str(cache_dir), **extra}


def _cli(cache_dir, *args):
    return subprocess.run([sys.executable, "-m", "cupy_paged", *args], cwd=REPO,
                          env=_env(cache_dir), check=False, capture_output=True, text=True,
                          timeout=600)


def _cubins(cache_dir, arch):
    """{variant name: mtime_ns} of the cache's cubins for arch."""
    out = {}
    for p in cache_dir.glob(f"*-{arch}-*.cubin"):
        out[p.stem.rsplit("-", 2)[0]] = p.stat().st_mtime_ns
    return out


@pytest.fixture(scope="module")
def model_build(cache_dir):
    """The model's precompile, run once: (completed process, cubins after it)."""
    done = _cli(cache_dir, "precompile", *MODEL)
    assert done.returncode == 0, done.stderr
    return done, _cubins(cache_dir, "sm_80")


# ---------------------------------------------------------------- which variants


def test_model_needs_prologue_gather_mea_both_flash_tiles_and_combine():
    names, skipped = needed_variants(["float16"], [128], 32, 8, archs=["sm_80"])
    assert skipped == []
    assert {n for n, _ in names} == {
        _guard.NAME, _prologue.prologue_name("float16"), _gather.gather_name("float16"),
        _mea_kernels.variant_name("float16", 80, 128),
        "flash_fwd_f16_h128_m16_n64_w4_k4_s3_swz_sm80",  # decode (G * q_len <= 16)
        "flash_fwd_f16_h128_m64_n64_w4_s2_swz_sm80",     # short chunks
        "flash_fwd_f16_h128_m128_n64_w4_s2_swz_sm80",    # prefill
        _flash_kernels.combine_name("float16")}
    assert {a for _, a in names} == {"sm_80"}


def test_flash_tiles_follow_the_group_size_and_the_arch_class():
    def flash(head, n, nkv, arch):
        names, _ = needed_variants(["bfloat16"], [head], n, nkv, archs=[arch])
        return sorted(n for n, _ in names if n.startswith("flash_fwd"))

    # G = 128 rows per decode token: the short-row tile can never be picked
    assert flash(128, 128, 1, "sm_80") == ["flash_fwd_bf16_h128_m128_n64_w4_s2_swz_sm80"]
    assert flash(128, 128, 1, "sm_86") == ["flash_fwd_bf16_h128_m128_n32_w4_s2_swz_sm86"]
    assert flash(256, 32, 8, "sm_90") == ["flash_fwd_bf16_h256_m16_n64_w4_k4_s2_swz_sm80",
                                          "flash_fwd_bf16_h256_m64_n32_w4_s2_swz_sm80"]
    assert flash(40, 8, 8, "sm_89") == ["flash_fwd_bf16_h64_m128_n64_w4_s2_swz_sm86",
                                        "flash_fwd_bf16_h64_m16_n64_w4_k4_s2_swz_sm86",
                                        "flash_fwd_bf16_h64_m64_n64_w4_s2_swz_sm86"]


def test_all_is_every_kernel_the_backends_can_launch_on_the_arch():
    names, skipped = needed_variants(all=True, archs=["sm_86"])
    got = {n for n, _ in names}
    tag = _mea_kernels.arch_tag(86)
    mea = {n for n in _mea_kernels.all_variant_names() if f"_sm{tag}_" in n}
    assert got == (set(_flash_kernels.all_variant_names("sm86")) | mea | {_guard.NAME}
                   | {f(d) for f in (_prologue.prologue_name, _gather.gather_name)
                      for d in ("float16", "bfloat16")})
    assert skipped == []


def test_unbuildable_combinations_are_skipped_with_the_reason():
    names, skipped = needed_variants(head_sizes=[64], archs=["sm_75"])
    assert not [n for n, _ in names if "bf16" in n or n.startswith("flash")]
    # Worded for a target arch: no GPU need be here, so never "this GPU is sm75".
    assert Skipped("flash float16", "sm_75", "float16 needs sm_80 or newer") in skipped
    assert Skipped("mea bfloat16", "sm_75", "bfloat16 needs sm_80 or newer") in skipped
    assert not [s for s in skipped if "this GPU" in s.reason]
    _, skipped = needed_variants(["float16"], [128, 512], archs=["sm_80"])
    assert [str(s) for s in skipped] == [
        "flash float16 head_size 512 for sm_80: head_size 512 > 256",
        "mea float16 head_size 512 for sm_80: head_size 512 > 256"]


def test_an_arch_nvrtc_cannot_build_is_skipped_whole(monkeypatch):
    monkeypatch.setattr(precompile_module, "nvrtc_archs", lambda: (75, 80, 90))  # as NVRTC 13
    names, _ = needed_variants(["float16"], [64], archs=["sm_70", "sm_80"])
    ok, skipped = precompile_module.buildable_variants(names)
    assert {a for _, a in ok} == {"sm_80"}
    assert [(s.what, s.arch) for s in skipped] == [("every kernel", "sm_70")]
    assert "cannot build sm_70" in skipped[0].reason


def test_missing_cutlass_skips_only_the_cutlass_kernels(monkeypatch):
    import dataclasses
    tc = dataclasses.replace(find_toolchain(), cutlass_include=None,
                             cutlass_missing="CUTLASS headers were not found: pip install it")
    monkeypatch.setattr(precompile_module, "find_toolchain", lambda: tc)
    names, _ = needed_variants(["float16"], [128], archs=["sm_80"])
    ok, skipped = precompile_module.buildable_variants(names)
    assert [s.what for s in skipped] == [_mea_kernels.variant_name("float16", 80, 128)]
    assert skipped[0].reason.startswith("CUTLASS headers were not found")
    assert len(ok) == len(names) - 1


# ---------------------------------------------------------------- building


def test_model_precompile_compiles_into_the_cache(model_build, cache_dir):
    done, cubins = model_build
    names, _ = needed_variants(["float16"], [128], 32, 8, archs=["sm_80"])
    assert set(cubins) == {n for n, _ in names}
    assert re.search(rf"compiled {len(names)}, cached 0, skipped 0 for sm_80 in [\d.]+ s",
                     done.stdout), done.stdout
    assert f"{len(names)}/{len(names)}" in done.stderr  # the progress bar reached the end


def test_second_run_is_a_no_op_that_says_everything_is_cached(model_build, cache_dir):
    _, before = model_build
    done = _cli(cache_dir, "precompile", *MODEL)
    assert done.returncode == 0, done.stderr
    m = re.search(r"all (\d+) kernels for sm_80 are already cached in (.+); nothing compiled "
                  r"\(([\d.]+) s\)", done.stdout)
    assert m, done.stdout
    assert int(m.group(1)) == len(before) and m.group(2) == str(cache_dir)
    assert float(m.group(3)) < 5  # cache lookups only: no worker processes
    assert _cubins(cache_dir, "sm_80") == before  # nothing rewritten


def test_library_call_returns_the_summary(model_build, cache_dir):
    summary = precompile(dtypes=["fp16"], head_sizes=[128], num_heads=32, kv_num_heads=8,
                         arch=80, progress=False)
    assert summary.archs == ("sm_80",) and not summary.compiled and not summary.skipped
    assert {v.name for v in summary.cached} == set(model_build[1])
    assert all(v.cached and v.path.is_file() for v in summary.cached)
    assert "already cached" in str(summary)


def test_list_marks_cached_and_uncompiled_kernels(model_build, cache_dir, capsys):
    assert main(["--list", "--arch", "sm_80", "--dtype", "float16", "--head-size", "64",
                 "128", "--num-heads", "32", "--kv-heads", "8"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        name, arch, state = line.split(None, 2)
        rows[name] = (arch, state)
    assert rows["mea_fwd_f16_sm80_q64_k128_h128"] == ("sm_80", "cached")
    assert rows["mea_fwd_f16_sm80_q64_k64_h64"] == ("sm_80", "to compile")
    assert not list(cache_dir.glob("*q64_k64_h64*"))


def test_all_for_sm86_with_two_jobs_builds_everything(cache_dir):
    done = _cli(cache_dir, "precompile", "--all", "--arch", "sm_86", "--jobs", "2")
    assert done.returncode == 0, done.stderr
    names, _ = needed_variants(all=True, archs=["sm_86"])
    assert set(_cubins(cache_dir, "sm_86")) == {n for n, _ in names}
    assert f"compiled {len(names)}, cached 0, skipped 0 for sm_86" in done.stdout


def test_nothing_buildable_exits_1_and_says_why(cache_dir, capsys):
    assert main(["--arch", "sm_75", "--dtype", "bf16", "--head-size", "64"]) == 1
    out = capsys.readouterr().out
    assert "skipped mea bfloat16 for sm_75: bfloat16 needs sm_80 or newer" in out
    assert "this GPU" not in out
    assert "nothing to build for sm_75" in out


def test_no_gpu_and_no_arch_says_to_pass_arch(cache_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # as on a machine without CuPy or a GPU
    assert main(["--head-size", "128"]) == 1
    assert "pass arch= (--arch sm_80 ...)" in capsys.readouterr().err


@pytest.mark.parametrize("listing", [True, False], ids=["list", "build"])
def test_without_cupy_names_the_cupy_package(listing, cache_dir, capsys, monkeypatch):
    for name in ("cupy", "cupy_backends"):        # as on a machine where CuPy is not installed
        monkeypatch.setitem(sys.modules, name, None)
    argv = ["--arch", "sm_80", "--head-size", "64"] + (["--list"] if listing else [])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "no module named 'cupy'" in err and "pip install cupy-cuda12x" in err
    assert "cupy_backends" not in err


def test_without_a_driver_no_arch_says_no_gpu_found(cache_dir, capsys, monkeypatch):
    cupy = pytest.importorskip("cupy", reason="CuPy is what reports the missing driver")

    class NoDriver(Exception):
        status = 35                                # cudaErrorInsufficientDriver

    def count():
        raise NoDriver("cudaErrorInsufficientDriver: CUDA driver version is insufficient "
                       "for CUDA runtime version")

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", count)
    monkeypatch.setattr(cupy.cuda.runtime, "driverGetVersion", lambda: 0)
    assert main(["--head-size", "64"]) == 1
    err = capsys.readouterr().err
    assert "no NVIDIA driver/GPU found" in err and "insufficient" not in err


@pytest.mark.parametrize("args,message", [
    ([], "--head-size 128"),
    (["--head-size", "100"], "head_size: must be a multiple of 8"),
    (["--head-size", "0"], "head_size: expected a positive integer"),
    (["--head-size", "abc"], "invalid int value: 'abc'"),
    (["--head-size", "64", "--dtype", "float32"], "dtype: the GPU kernels run float16 or bfloat16"),
    (["--head-size", "64", "--num-heads", "32", "--kv-heads", "5"],
     "num_heads: must be a multiple of kv_num_heads (5)"),
    (["--head-size", "64", "--kv-heads", "2"], "--num-heads with --kv-heads"),
    (["--all", "--head-size", "64"], "builds every head size; pass one or the other"),
    (["--head-size", "64", "--jobs", "0"], "jobs: expected a positive integer"),
    (["--head-size", "64", "--block-size", "0"], "block_size: expected a positive integer"),
])
def test_bad_arguments_exit_2_with_the_fix(args, message, capsys, cache_dir):
    with pytest.raises(SystemExit) as exc:
        main(["--arch", "sm_80", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m cupy_paged precompile") and message in err, err


def test_bad_arch_from_the_command_line(cache_dir):
    done = _cli(cache_dir, "precompile", "--arch", "sm_90a", "--head-size", "128")
    assert done.returncode == 2
    assert "arch: expected an SM such as sm_80 or 80" in done.stderr and "'sm_90a'" in done.stderr


def test_library_argument_errors_are_value_errors(cache_dir):
    with pytest.raises(ValueError, match="arch: expected an SM"):
        precompile(head_sizes=[64], arch="compute_80")
    with pytest.raises(ValueError, match="arch: pass at least one SM"):
        precompile(head_sizes=[64], arch=[])
    with pytest.raises(ValueError, match="head_size: expected a positive integer"):
        precompile(head_sizes=[64.5], arch="sm_80")


def test_progress_without_tqdm_prints_plain_lines(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    bar = precompile_module._Progress(2, True)

    class R:
        name, arch, seconds = "prologue_f16", "sm_80", 0.25

    bar.update(R)
    bar.close()
    err = capsys.readouterr().err
    assert "install tqdm for a progress bar" in err
    assert "[1/2] compiled prologue_f16 for sm_80 in 0.2 s" in err


# ---------------------------------------------------------------- the first-compile log line

COMPILE = textwrap.dedent("""
    import logging, os, sys
    mode = sys.argv[1]
    if mode == "app-info":
        logging.basicConfig(level=logging.INFO)
    elif mode == "app-warning":
        logging.basicConfig(level=logging.WARNING)
    from cupy_paged.jit import compile_variant
    compile_variant("smoke_axpy_f16", "sm_75")
    if mode == "configured-later":
        logging.basicConfig(level=logging.WARNING)
        compile_variant("smoke_axpy_f32", "sm_75")
""")


def _compile_in_subprocess(tmp_path, mode, **env):
    done = subprocess.run([sys.executable, "-c", COMPILE, mode], env=_env(tmp_path, **env),
                          cwd=REPO,
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_first_compile_logs_to_stderr_when_no_logging_is_configured(tmp_path):
    err = _compile_in_subprocess(tmp_path, "plain")
    assert "cupy_paged: compiling smoke_axpy_f16 for sm_75 ..." in err
    assert re.search(r"cupy_paged: compiled smoke_axpy_f16 for sm_75 in [\d.]+ s", err)
    assert _compile_in_subprocess(tmp_path, "plain") == ""  # cached: nothing to say


def test_quiet_env_turns_the_line_off(tmp_path):
    assert "compiling" not in _compile_in_subprocess(tmp_path, "plain", CUPY_PAGED_QUIET="1")


def test_an_application_logging_config_is_respected(tmp_path):
    err = _compile_in_subprocess(tmp_path / "a", "app-info")
    assert err.count("compiling smoke_axpy_f16") == 1  # through the app's handler, once
    assert "INFO:cupy_paged.jit:compiling smoke_axpy_f16 for sm_75" in err
    assert _compile_in_subprocess(tmp_path / "b", "app-warning") == ""
    err = _compile_in_subprocess(tmp_path / "c", "configured-later")
    assert "compiling smoke_axpy_f16" in err and "smoke_axpy_f32" not in err


def test_compile_many_reports_worker_compiles_once_from_the_parent(tmp_path):
    code = ("from cupy_paged.jit import compile_many\n"
            "if __name__ == '__main__':\n"
            "    items = [('smoke_axpy_f16', 'sm_80'), ('smoke_axpy_f32', 'sm_80')]\n"
            "    compile_many(items, jobs=2)\n")
    script = tmp_path / "many.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], env=_env(tmp_path), check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "compiling" not in done.stderr  # the workers stay quiet
    for name in ("smoke_axpy_f16", "smoke_axpy_f32"):
        assert done.stderr.count(f"cupy_paged: compiled {name} for sm_80") == 1, done.stderr


@pytest.mark.gpu
def test_first_paged_attention_call_logs_each_compile(tmp_path):
    code = textwrap.dedent("""
        import cupy, numpy
        import cupy_paged as cpg
        cache = cpg.PagedKVCache(num_blocks=4, block_size=16, kv_num_heads=2, head_size=64,
                                 dtype=numpy.float16, xp=cupy)
        seq = cache.add_sequence()
        step = cache.begin_step({seq: 3})
        q = cupy.zeros((3, 4 * 64), dtype=cupy.float16)
        kv = cupy.zeros((3, 2 * 64), dtype=cupy.float16)
        cpg.paged_attention(q, kv, kv, cache.key_cache, cache.value_cache,
                            step.cumulative_sequence_length, step.past_seqlens,
                            step.block_table, num_heads=4, kv_num_heads=2)
        cupy.cuda.Device().synchronize()
    """)
    done = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path),
                          check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "cupy_paged: compiling prologue_f16 for sm_" in done.stderr
    assert re.search(r"cupy_paged: compiled \w+ for sm_\d+ in [\d.]+ s", done.stderr)
