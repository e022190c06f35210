"""The benchmark harness without a GPU: the two numbers, the cases, and the writers.

The harness is cupy_paged._bench (shipped in the wheel); benchmarks/ of the checkout holds
shims under the old names and the scripts that use them. Nothing here needs torch (CI has
none) and the harness must not import it for --list.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cupy_paged._bench import cases as C  # noqa: E402
from cupy_paged._bench import report  # noqa: E402
from cupy_paged._bench import run as bench_run  # noqa: E402

REPO_RESULTS = ROOT / "benchmarks" / "results"


def brute_flops(case):
    """4*H per (query head, row, visible key), counted row by row."""
    keys = 0
    for q, p in zip(case.q_lens, case.past):
        for j in range(q):
            keys += p + j + 1
    return 4 * case.head_size * case.num_heads * keys


# --- the two numbers on tiny hand-checked cases -------------------------------------------
def test_flops_and_bytes_tiny_prefill_chunk():
    # one sequence, 2 new tokens after 1 cached: rows see 2 and 3 keys -> 5 (row, key) pairs
    c = C.Case("t", q_lens=(2,), past=(1,), num_heads=2, kv_num_heads=1, head_size=8,
               block_size=4)
    assert c.flops() == 4 * 8 * 2 * 5 == 320
    parts = c.bytes_breakdown()
    assert parts["kv_read"] == 2 * (2 * 1 * 8 * 3) == 96         # K+V, 3 rows, 1 kv head
    assert parts["q_read_out_write"] == 2 * (2 * 2 * 8 * 2) == 128  # Q + out, 2 rows, 2 heads
    assert parts["kv_write"] == 2 * (2 * 1 * 8 * 2) == 64        # new K+V into the cache
    assert c.min_bytes() == 288


def test_flops_and_bytes_tiny_decode_and_empty_sequence():
    # decode at past 3 (sees 4 keys) + a sequence with no new tokens (sees nothing)
    c = C.Case("t", q_lens=(1, 0), past=(3, 5), num_heads=4, kv_num_heads=2, head_size=16,
               block_size=2, dtype="float32")
    assert c.flops() == 4 * 16 * 4 * 4 == 1024
    assert c.kv_lens == (4, 0)
    e = 4
    assert c.min_bytes() == e * (2 * 2 * 16 * 4 + 2 * 4 * 16 * 1 + 2 * 2 * 16 * 1)
    assert c.num_tokens == 1


@pytest.mark.parametrize("name", list(C.CASES))
def test_named_case_flops_match_brute_force(name):
    c = C.make_case(name)
    assert c.flops() == brute_flops(c)
    assert c.min_bytes() == sum(c.bytes_breakdown().values())
    assert f"{c.flops():.4g}" in c.flops_formula()
    assert f"{c.min_bytes():.4g}" in c.bytes_formula()


def test_named_case_numbers():
    pre = C.make_case("prefill_8x2048")
    assert pre.flops() == 4 * 128 * 32 * 8 * (2048 * 2049 // 2)
    assert pre.min_bytes() == 2 * (2 * 8 * 128 * 8 * 2048 + 2 * 32 * 128 * 16384
                                   + 2 * 8 * 128 * 16384)
    dec = C.make_case("decode_64x4096")
    assert dec.flops() == 4 * 128 * 32 * 64 * 4096
    assert dec.bytes_breakdown()["kv_read"] == 2 * 2 * 8 * 128 * 64 * 4096   # 1 GiB
    big = C.make_case("decode_4x32768")
    assert big.kv_lens == (32768,) * 4
    mixed = C.make_case("mixed")
    assert mixed.q_lens[:4] == (512,) * 4 and mixed.past[:4] == (0, 1024, 2048, 3072)
    assert mixed.q_lens[4:] == (1,) * 60 and mixed.past[4:] == (4095,) * 60
    assert mixed.num_tokens == 4 * 512 + 60
    # block size does not change the two numbers
    assert C.make_case("prefill_8x2048", 256).flops() == pre.flops()
    assert C.make_case("prefill_8x2048", 256).min_bytes() == pre.min_bytes()


def test_floors():
    c = C.make_case("decode_64x4096")
    mem, comp, floor = c.floors_ms(3.0e12, 800e12)
    assert mem == pytest.approx(1e3 * c.min_bytes() / 3.0e12)
    assert comp == pytest.approx(1e3 * c.flops() / 800e12)
    assert floor == max(mem, comp) == mem          # decode is bound by bytes
    p = C.make_case("prefill_8x2048")
    assert p.floors_ms(3.0e12, 800e12)[2] == p.floors_ms(3.0e12, 800e12)[1]  # by FLOPs


# --- case construction ---------------------------------------------------------------------
@pytest.mark.parametrize("name,bs", [(n, 16) for n in C.CASES] + [("prefill_8x2048", 256),
                                                                  ("mixed", 7)])
def test_metadata_consistent_and_shuffled(name, bs):
    c = C.make_case(name, bs)
    meta = C.build_metadata(c, seed=3)
    cum, past, table = (meta.cumulative_sequence_length, meta.past_seqlens, meta.block_table)
    assert cum.dtype == past.dtype == table.dtype == np.int32
    assert cum.shape == (c.batch + 1,) and past.shape == (c.batch,)
    assert cum[0] == 0 and cum[-1] == c.num_tokens
    assert np.array_equal(np.diff(cum), c.q_lens)
    assert np.array_equal(past, c.past)
    need = [-(-(p + q) // bs) for q, p in zip(c.q_lens, c.past)]
    assert table.shape == (c.batch, max(need))
    assert meta.num_blocks == c.num_blocks == sum(need)
    for b in range(c.batch):
        assert (table[b, :need[b]] >= 0).all() and (table[b, need[b]:] == -1).all()
    used = table[table >= 0]
    assert np.array_equal(np.sort(used), np.arange(c.num_blocks))     # each block once
    if c.num_blocks > 8:
        assert not np.array_equal(used, np.arange(c.num_blocks))      # shuffled
    # same seed, same table; another seed, another one
    assert np.array_equal(C.build_metadata(c, seed=3).block_table, table)
    if c.num_blocks > 8:
        assert not np.array_equal(C.build_metadata(c, seed=4).block_table, table)


@pytest.mark.parametrize("name,bs", [("mixed", 16), ("mixed", 5), ("prefill_8x2048", 256)])
def test_token_slots(name, bs):
    c = C.make_case(name, bs)
    meta = C.build_metadata(c)
    blk, off = C.token_slots(c, meta)
    assert blk.shape == off.shape == (c.num_tokens,)
    assert len(set(zip(blk.tolist(), off.tolist()))) == c.num_tokens     # no two rows collide
    for b in (0, c.batch - 1):
        for j in (0, c.q_lens[b] - 1):
            t, p = int(meta.cumulative_sequence_length[b]) + j, c.past[b] + j
            assert blk[t] == meta.block_table[b, p // bs] and off[t] == p % bs


def test_groups():
    mixed = C.make_case("mixed")
    g = C.groups(mixed)
    assert [(x.first, x.count, x.q_len, x.past) for x in g] == [
        (0, 1, 512, 0), (1, 1, 512, 1024), (2, 1, 512, 2048), (3, 1, 512, 3072),
        (4, 60, 1, 4095)]
    assert [x.row0 for x in g] == [0, 512, 1024, 1536, 2048]
    assert g[-1].kv_len == 4096
    loose = C.groups(mixed, same_past=False)
    assert [(x.first, x.count, x.q_len, x.past) for x in loose] == [(0, 4, 512, None),
                                                                    (4, 60, 1, 4095)]
    assert [(x.count, x.q_len) for x in C.groups(C.make_case("prefill_8x2048"))] == [(8, 2048)]
    c = C.Case("t", q_lens=(3, 0, 3), past=(0, 4, 0), num_heads=2, kv_num_heads=1,
               head_size=8)
    assert [(x.first, x.count, x.row0) for x in C.groups(c)] == [(0, 1, 0), (2, 1, 3)]


def test_plan_and_input_sets():
    p = C.plan()
    assert [(c.name, c.block_size) for c in p] == [
        ("prefill_8x2048", 16), ("prefill_8x2048", 256), ("decode_64x4096", 16),
        ("decode_4x32768", 16), ("mixed", 16)]
    assert [(c.name, c.block_size) for c in C.plan(["mixed"], [16, 32])] == [
        ("mixed", 16), ("mixed", 32)]
    with pytest.raises(KeyError, match="known"):
        C.make_case("nope")
    l2 = 50 * 2 ** 20
    assert C.n_input_sets(10 ** 9, l2) == 1
    assert C.n_input_sets(2 * l2, l2) == 1
    assert C.n_input_sets(l2, l2) == 3
    assert C.n_input_sets(10 * 2 ** 20, l2) == 8     # capped
    assert all(C.n_input_sets(c.min_bytes(), l2) == 1 for c in p)   # every case > 2x L2


def test_sample_rows():
    assert C.sample_rows(C.make_case("prefill_8x2048")) == [(0, 0), (0, 2047), (7, 0),
                                                             (7, 2047)]
    assert C.sample_rows(C.make_case("decode_64x4096")) == [(0, 0), (63, 0)]
    rows = C.sample_rows(C.make_case("mixed"))
    assert rows[:8] == [(0, 0), (0, 511), (1, 0), (1, 511), (2, 0), (2, 511), (3, 0), (3, 511)]
    assert rows[8:] == [(4, 0), (63, 0)]


# --- writers, from fake timings ------------------------------------------------------------
def fake_records():
    reason = ("no backend can run this call (backend='mea', float16, head_size 128, "
              "block_size 16, on sm90):\n  mea: not built into this version yet")
    return [
        {"case": "decode_64x4096", "block_size": 16, "impl": "ours:flash", "kind": "ours",
         "status": "ok", "ms": 0.5, "check": {"ok": True, "rel_err": 1e-4}},
        {"case": "decode_64x4096", "block_size": 16, "impl": "ours:mea", "kind": "ours",
         "status": "unsupported", "reason": reason},
        {"case": "decode_64x4096", "block_size": 16, "impl": "sdpa:cudnn", "kind": "peer",
         "status": "ok", "ms": 0.4, "check": {"ok": True, "rel_err": 2e-4}},
        {"case": "decode_64x4096", "block_size": 16, "impl": "sdpa:flash", "kind": "peer",
         "status": "failed", "reason": "RuntimeError: No available kernel."},
        {"case": "mixed", "block_size": 16, "impl": "ours:flash", "kind": "ours",
         "status": "unsupported", "reason": reason.replace("mea", "flash")},
        {"case": "mixed", "block_size": 16, "impl": "flex:paged", "kind": "peer",
         "status": "ok", "ms": 2.0, "check": {"ok": False, "rel_err": 0.5}},
    ]


CASE_NUMS = {("decode_64x4096", 16): {"flops": 4e9, "min_bytes": 1e9},
             ("mixed", 16): {"flops": 6e10, "min_bytes": 1.2e9}}


def test_finalize_rates_and_ratios():
    recs = report.finalize(fake_records(), CASE_NUMS)
    flash, mea, cudnn, fl, _, flex = recs
    assert flash["tflops"] == pytest.approx(4e9 / 0.5e-3 / 1e12)      # 8 TFLOP/s
    assert flash["gbps"] == pytest.approx(1e9 / 0.5e-3 / 1e9)         # 2000 GB/s
    assert cudnn["ratio"] == pytest.approx(0.5 / 0.4)                 # ours 1.25x slower
    assert fl["ratio"] is None and "tflops" not in fl
    assert flash["vs"] == {"sdpa:cudnn": pytest.approx(1.25)}
    assert mea["vs"] == {}
    assert flex["ratio"] is None                                       # none of ours ran
    assert flex["gbps"] == pytest.approx(1.2e9 / 2e-3 / 1e9)


def test_text_and_markdown_tables():
    recs = report.finalize(fake_records(), CASE_NUMS)
    text = report.text_table(recs)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["case", "block", "impl", "ms"]
    assert len(lines) == 2 + len(recs)
    flash_line = next(ln for ln in lines if "ours:flash" in ln and "decode" in ln)
    assert "0.5000" in flash_line and "8.0" in flash_line and "2000" in flash_line
    cudnn_line = next(ln for ln in lines if "sdpa:cudnn" in ln)
    assert "1.25" in cudnn_line
    mea_line = next(ln for ln in lines if "ours:mea" in ln)
    assert "unsupported: mea: not built into this version yet" in mea_line
    assert "CHECK FAILED" in next(ln for ln in lines if "flex:paged" in ln)
    md = report.markdown_table(recs, title="H100 test")
    mlines = md.strip().splitlines()
    assert mlines[0] == "H100 test"
    assert mlines[2].startswith("| case | block | impl | ms |")
    assert mlines[3].startswith("|---|")
    assert len(mlines) == 4 + len(recs)
    assert all(ln.count("|") == len(report.COLUMNS) + 1 for ln in mlines[2:])


def test_write_json_and_md(tmp_path):
    recs = report.finalize(fake_records(), CASE_NUMS)
    doc = {"card": "NVIDIA H100 80GB HBM3", "slug": report.slug("NVIDIA H100 80GB HBM3"),
           "date": "2026-11-25", "torch": "2.11.0", "cupy": "14.2.0", "copy_gbps": 3000.0,
           "results": recs, "markdown": report.markdown_table(recs)}
    jpath, mpath = report.write(doc, str(tmp_path / "results"))
    assert Path(jpath).name == "nvidia-h100-80gb-hbm3.json"
    back = json.loads(Path(jpath).read_text())
    assert back["card"] == "NVIDIA H100 80GB HBM3" and back["copy_gbps"] == 3000.0
    assert [r["impl"] for r in back["results"]] == [r["impl"] for r in recs]
    assert back["results"][2]["ratio"] == pytest.approx(1.25)
    assert Path(mpath).read_text() == doc["markdown"]


def test_slug_and_short_reason():
    assert report.slug("NVIDIA H200") == "nvidia-h200"
    assert report.slug("  ") == "unknown-card"
    r = "no backend can run this call:\n  flash: pending kernel\n  mea: pending too"
    assert report.short_reason(r, "ours:mea") == "mea: pending too"
    assert report.short_reason(r, "sdpa:flash") == "flash: pending kernel"
    assert report.short_reason("x" * 200, "p", width=20) == "x" * 17 + "..."


# --- command line, without torch -----------------------------------------------------------
def test_parse_args():
    a = bench_run.parse_args(["--case", "mixed", "decode_64x4096", "--case", "prefill_8x2048",
                              "--block-size", "16", "256", "--backends", "mea", "--quick"])
    assert a.cases == ["mixed", "decode_64x4096", "prefill_8x2048"]
    assert a.block_sizes == [16, 256] and a.backends == ["mea"]
    assert a.time_budget == bench_run.QUICK_BUDGET_S
    assert bench_run.parse_args([]).time_budget is None
    assert bench_run.parse_args(["--peers", ""]).peers == []
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--peers", "vllm"])
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--case", "nope"])
    with pytest.raises(SystemExit):                      # not a backend: says which are
        bench_run.parse_args(["--backends", "flash,flashinfer"])
    assert bench_run.parse_args(["--backends", "mea-attn"]).backends == ["mea-attn"]


def test_list_runs_without_torch():
    code = ("import sys; from cupy_paged import bench; rc = bench.main(['--list']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for name in C.CASES:
        assert name in res.stdout
    assert C.FLOPS_FORMULA in res.stdout and C.BYTES_FORMULA in res.stdout
    assert "prefill_8x2048/bs256" in res.stdout


def test_script_list(capsys):
    assert bench_run.main(["--list", "--case", "decode_4x32768"]) == 0
    out = capsys.readouterr().out
    assert "decode_4x32768/bs16" in out and "mixed" not in out


def test_committed_results_are_complete():
    """Every results JSON in the tree names its card, versions, ceilings and each row's fate."""
    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    for path in files:
        doc = json.loads(path.read_text())
        for key in ("card", "date", "torch", "cupy", "copy_gbps", "cases", "results"):
            assert key in doc, f"{path.name}: no {key}"
        assert path.name.startswith(report.slug(doc["card"]))
        assert {c["name"] for c in doc["cases"]} <= set(C.CASES)
        for c in doc["cases"]:
            case = C.make_case(c["name"], c["block_size"])
            assert (c["flops"], c["min_bytes"]) == (case.flops(), case.min_bytes())
        for r in doc["results"]:
            assert r["status"] in ("ok", "unsupported", "failed", "skipped"), r
            assert (r["status"] == "ok") == (r.get("ms") is not None), r
            assert r["status"] == "ok" or r.get("reason"), r


def test_plot_draws_the_committed_h100_results(tmp_path):
    pytest.importorskip("matplotlib", reason='no matplotlib: pip install ".[notebook]"')
    from cupy_paged._bench import plot

    path = REPO_RESULTS / "nvidia-h100-80gb-hbm3.backends-quick-2026-11-25.json"
    out = plot.plot(json.loads(path.read_text()), tmp_path / "chart.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- ncu source counters -> executed instructions per HMMA --------------------------------
def _sass_csv(rows):
    """ncu --page source --csv shape: kernel line, header, one row per SASS instruction."""
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)",
              "Warp Stall Sampling (Not-issued Samples)", "Instructions Executed",
              "stall_wait", "stall_long_sb", "stall_wait (Not Issued)"]
    lines = ['"Kernel Name","k",', ",".join(f'"{h}"' for h in header)]
    for addr, src, samples, executed, wait, long_sb in rows:
        lines.append(",".join(f'"{v}"' for v in (addr, src, samples, 0, executed, wait,
                                                  long_sb, 0)))
    return lines


def test_sass_profile_counts_executions_not_static_instructions():
    from benchmarks import sass_profile

    # a loop body of 2 HMMA + 1 LDSM run 100 times, a copy loop of 2 instructions run 800
    # times, 3 instructions run once: 6 static instructions, 1903 executed, 200 HMMA
    rows = [("0x10", "      LDC R1, c[0x0][0x28]", 1, 1, 1, 0),
            ("0x20", "      S2R R0, SR_TID.X", 0, 1, 0, 0),
            ("0x30", "      LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64]", 5, 800, 0, 5),
            ("0x40", "  @P0 BRA 0x30", 1, 800, 1, 0),
            ("0x50", "      LDSM.16.M88.4 R8, [R3]", 2, 100, 0, 2),
            ("0x60", "      HMMA.16816.F32 R12, R8, R16, R12", 10, 100, 9, 1),
            ("0x70", "  @!P1 HMMA.16816.F32 R20, R8, R18, R20", 4, 100, 4, 0),
            ("0x80", "      EXIT", 0, 1, 0, 0)]
    kernel, instr = sass_profile.read(_sass_csv(rows))
    assert kernel == "k" and len(instr) == 8
    assert [i.opcode for i in instr][:4] == ["LDC", "S2R", "LDGSTS", "BRA"]
    assert instr[6].opcode == "HMMA" and instr[6].stalls == {"wait": 4, "long_sb": 0}
    text = "\n".join(sass_profile.summary(instr))
    assert "executed instructions 1,903" in text
    assert "HMMA 200: 9.52 instructions per HMMA" in text
    assert "wait" in text and "long_sb" in text
    # the copy loop (2 instructions x 800) is its own group, and the largest by executions
    assert "    2 x        800 =     0.00 M" in text


def test_sass_profile_rejects_other_csv():
    from benchmarks import sass_profile

    with pytest.raises(ValueError, match="not ncu source-page CSV"):
        sass_profile.read(['"Kernel Name","k",', '"ID","Name"', '"1","x"'])


def test_ordered_block_table_keeps_each_sequence_contiguous():
    """tile_sweep.py --tables ordered: the same blocks as the shuffled table, in order."""
    case = C.make_case("mixed")
    ordered = C.build_metadata(case, shuffle=False).block_table
    shuffled = C.build_metadata(case).block_table
    start = 0
    for b, n in enumerate(case.blocks_per_seq):
        assert list(ordered[b, :n]) == list(range(start, start + n))
        assert (ordered[b, n:] == -1).all()
        start += n
    assert sorted(ordered[ordered >= 0]) == sorted(shuffled[shuffled >= 0])


def test_gpu_scripts_import_without_a_gpu():
    import importlib

    for name in ("host_overhead", "host_stages", "tile_sweep", "profile_case"):
        assert callable(importlib.import_module(f"benchmarks.{name}").main)
