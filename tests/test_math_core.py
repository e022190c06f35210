"""The shared math core of cuda_src/common/ on the CPU: every header builds on its own under NVRTC
for the archs its users run on; compile-time checks (static_assert, evaluated by NVRTC) that the
column form and the tile test of the visibility rule equal the rule itself, and that the arch
table holds the numbers the host side uses; and that flash and mea keep a single implementation
of the transcendental math (no tanhf / exp2f / tanh.approx of their own).
"""
import re
from pathlib import Path

import pytest

from cupy_paged.jit.toolchain import find_toolchain

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "cuda_src"
HEADERS = ["arch", "dtypes", "fast_math", "paged_kv", "score_transform", "seq_lookup",
           "softmax_state", "visibility"]
ARCH_ENTRY = re.compile(r"^\s*\{(\d+), (\d+), (\d+), (true|false), (\d+), (\d+), (\d+)\},"
                        r"\s*// sm(\d+)\s*$")


def nvrtc_ptx(source, arch):
    """PTX of `source` (cuda_src on the include path) for compute capability `arch`, or skip."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError:
        pytest.skip("no NVRTC (cupy) in this environment")
    if int(arch) not in nvrtc.getSupportedArchs():
        pytest.skip(f"this NVRTC cannot build sm_{arch}")
    tc = find_toolchain()
    options = [f"--gpu-architecture=compute_{arch}", "-std=c++17"]
    options += [f"-I{d}" for d in tc.include_dirs()]
    prog = nvrtc.createProgram(source, "math_core_probe.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as exc:
            pytest.fail(f"NVRTC: {exc}\n{nvrtc.getProgramLog(prog)}")
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


@pytest.mark.parametrize("arch", [50, 70, 80, 90])
@pytest.mark.parametrize("header", HEADERS)
def test_common_header_builds_alone(header, arch):
    nvrtc_ptx(f'#include "common/{header}.cuh"\nextern "C" __global__ void probe() {{}}\n', arch)


# Exhaustive over small ranges, at compile time: NVRTC refuses the program if any case fails.
VISIBILITY_CHECKS = r"""
#include "common/arch.cuh"
#include "common/visibility.cuh"
using namespace cupy_paged;

__host__ __device__ constexpr bool columns_match_rule() {
  for (int w = -1; w <= 6; ++w)
    for (int p = -3; p <= 20; ++p)
      for (int key0 = -4; key0 <= 12; ++key0) {
        const VisibleColumns cols(p, key0, w);
        for (int j = 0; j < 24; ++j)
          if (cols.contains(j) != key_visible(key0 + j, p, w)) return false;
      }
  return true;
}

__host__ __device__ constexpr bool tile_test_matches_rule(int w) {
  for (int kf = 0; kf <= 5; ++kf)
    for (int kl = kf; kl <= kf + 3; ++kl)
      for (int pf = -2; pf <= 7; ++pf)
        for (int pl = pf; pl <= pf + 3; ++pl) {
          bool hidden = false;
          for (int k = kf; k <= kl; ++k)
            for (int p = pf; p <= pl; ++p) hidden |= !key_visible(k, p, w);
          if (partly_hidden(kf, kl, pf, pl, w) != hidden) return false;
        }
  return true;
}

static_assert(columns_match_rule(), "VisibleColumns == key_visible");
static_assert(tile_test_matches_rule(-1) && tile_test_matches_rule(0) &&
              tile_test_matches_rule(1) && tile_test_matches_rule(2) &&
              tile_test_matches_rule(3) && tile_test_matches_rule(5),
              "partly_hidden == some key hidden from some row");
static_assert(key_visible(5, 5, 0) && !key_visible(6, 5, 0), "causal: k <= p");
static_assert(key_visible(3, 5, 3) && !key_visible(2, 5, 3), "window W: k > p - W");
static_assert(arch::info(80).smem_per_block == 166912 && arch::info(86).smem_per_block == 101376,
              "the flash tile classes' limits");
static_assert(arch::info(90).cp_async && !arch::info(75).cp_async, "cp.async from sm80");
static_assert(arch::info(42).sm == 0, "unknown SMs have no entry");

extern "C" __global__ void probe() {}
"""


def test_visibility_rule_and_arch_table_at_compile_time():
    nvrtc_ptx(VISIBILITY_CHECKS, 80)


def arch_table():
    rows = {}
    for line in (SRC / "common" / "arch.cuh").read_text().splitlines():
        m = ARCH_ENTRY.match(line)
        if m:
            sm, block, per_sm, cp, mm, mn, mk, tag = m.groups()
            assert sm == tag, line
            rows[int(sm)] = (int(block), int(per_sm), cp == "true", (int(mm), int(mn), int(mk)))
    return rows


def test_arch_table_lines_parse_and_agree_with_the_host_numbers():
    rows = arch_table()
    text = (SRC / "common" / "arch.cuh").read_text()
    assert len(rows) == len(re.findall(r"^\s*\{.*// sm\d+", text, re.M)), "every entry parses"
    from cupy_paged.backends import _flash_kernels, _flash_tiles
    for cls, limit in _flash_tiles.SMEM_LIMIT.items():
        assert rows[int(cls[2:])][0] == limit, cls
    per_sm_table = (getattr(_flash_tiles, "_SMEM_PER_SM", None)
                    or getattr(_flash_kernels, "_SMEM_PER_SM", None) or {})
    for sm, per_sm in per_sm_table.items():
        assert rows[sm][1] == per_sm, sm
    for sm, (block, per_sm, cp_async, mma) in rows.items():
        assert block <= per_sm and cp_async == (sm >= 80), sm
        assert mma == ((16, 8, 16) if sm >= 80 else (16, 8, 8) if sm == 75 else
                       (8, 8, 4) if sm == 70 else (0, 0, 0)), sm


MATH_USERS = sorted(p for p in SRC.rglob("*.cu*") if p.parts[-2] in ("flash", "mea"))


@pytest.mark.parametrize("path", MATH_USERS, ids=lambda p: f"{p.parts[-2]}/{p.name}")
def test_kernels_use_the_shared_transcendentals(path):
    code = re.sub(r"//[^\n]*", "", path.read_text())
    for own in ("tanhf(", "exp2f(", "__expf(", "tanh.approx", "ex2.approx", "rcp.approx",
                "numeric_limits<accum_t>::infinity"):
        assert own not in code, f"{path.name}: {own} (common/fast_math.cuh, softmax_state.cuh)"


def test_math_core_probe_kernel_uses_one_tanh():
    source = r"""
#include "common/paged_kv.cuh"
#include "common/score_transform.cuh"
#include "common/seq_lookup.cuh"
#include "common/softmax_state.cuh"
using namespace cupy_paged;

extern "C" __global__ void probe(const float* s, const int* starts, const int* table, float* out,
                                 long long* slots, float scale, float softcap, int batch) {
  const ScoreTransform tr = ScoreTransform::make(scale, softcap);
  softmax::RowState st = softmax::RowState::empty();
  bool moved = false;
  const float x = tr.capped ? tr.softcapped(s[threadIdx.x]) : tr.plain(s[threadIdx.x]);
  const float corr = st.update(x, moved);
  st.add(corr, fast_exp2(x - st.offset()));
  out[threadIdx.x] = st.inv_sum() + st.lse() + st.rebase(x + 1.0f) + softmax::divisor(st.l);
  const PagedKV<const float> kv{s, s, table, 16, 4, 8, BlockDiv::of(batch)};
  slots[threadIdx.x] = kv.slot(sequence_of_row(starts, batch, threadIdx.x), threadIdx.x);
}
"""
    ptx = nvrtc_ptx(source, 80)
    assert "tanh.approx" not in ptx and "ex2.approx.ftz.f32" in ptx
    assert "rcp.approx.ftz.f32" in ptx  # tanh_exp's 1 / (1 + e^2x)
