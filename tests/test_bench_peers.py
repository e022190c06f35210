"""The benchmark harness's peers and rows without a GPU: the paged peers' block-table
translations (FlashInfer, cuDNN page tables) and selection, our rows against the fastest peer,
and the --sinks row with its reference. Nothing here needs a GPU; the torch parts skip without
torch.
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


# --- the paged peers (FlashInfer, cuDNN page tables): translations and selection, on CPU ---
def _ragged_table():
    # 3 sequences, block_size 4: kv 6 (2 pages, last holds 2), kv 0 (empty), kv 8 (2 full)
    table = np.array([[5, 2, -1], [-1, -1, -1], [0, 7, -1]], dtype=np.int32)
    return table, (6, 0, 8), 4


@pytest.mark.parametrize("as_torch", [False, True])
def test_flashinfer_page_metadata(as_torch):
    from cupy_paged._bench import peers_paged as PP
    table, kv, bs = _ragged_table()
    if as_torch:
        torch = pytest.importorskip("torch")
        table, kv = torch.as_tensor(table), torch.as_tensor(kv)
    indptr, indices, last = PP.flashinfer_page_metadata(table, kv, bs)
    assert indptr.dtype == indices.dtype == last.dtype == np.int32
    assert indptr.tolist() == [0, 2, 2, 4]
    assert indices.tolist() == [5, 2, 0, 7]
    assert last.tolist() == [2, 0, 4]
    # FlashInfer's kv_len = clamp(pages - 1, 0) * page_size + last_page_len gives kv back
    pages = np.diff(indptr)
    assert (np.maximum(pages - 1, 0) * bs + last).tolist() == [6, 0, 8]


def test_flashinfer_page_metadata_on_a_case_and_bad_tables():
    from cupy_paged._bench import peers_paged as PP
    c = C.make_case("mixed", 7)               # 7 divides none of the kv lengths
    meta = C.build_metadata(c, seed=1)
    indptr, indices, last = PP.flashinfer_page_metadata(meta.block_table, c.kv_lens, 7)
    assert indptr[-1] == c.num_blocks == len(indices)
    assert np.array_equal(np.sort(indices), np.arange(c.num_blocks))
    for b, kv in enumerate(c.kv_lens):
        assert np.array_equal(indices[indptr[b]:indptr[b + 1]],
                              meta.block_table[b, :-(-kv // 7)])
        assert last[b] == kv - 7 * (-(-kv // 7) - 1)
    with pytest.raises(ValueError):           # -1 inside a sequence's needed pages
        PP.flashinfer_page_metadata(np.array([[3, -1]]), [5], 4)
    with pytest.raises(ValueError):           # table too narrow
        PP.flashinfer_page_metadata(np.array([[3]]), [5], 4)


@pytest.mark.parametrize("as_torch", [False, True])
def test_cudnn_page_table(as_torch):
    from cupy_paged._bench import peers_paged as PP
    table, kv, bs = _ragged_table()
    if as_torch:
        torch = pytest.importorskip("torch")
        table = torch.as_tensor(table)
    pt = PP.cudnn_page_table(table, kv, bs)
    assert pt.dtype == np.int32 and pt.shape == (3, 1, 2, 1)
    assert pt[:, 0, :, 0].tolist() == [[5, 2], [0, 0], [0, 7]]      # -1 never reaches cuDNN
    wide = PP.cudnn_page_table(table, kv, bs, max_pages=3)
    assert wide.shape == (3, 1, 3, 1) and wide[:, 0, :, 0].tolist() == [[5, 2, 0], [0, 0, 0],
                                                                         [0, 7, 0]]
    assert PP.cudnn_page_table(np.full((1, 1), -1), [0], 16).shape == (1, 1, 1, 1)
    with pytest.raises(ValueError):
        PP.cudnn_page_table(np.array([[1, -1]]), [5], 4)


def test_paged_peer_selection_per_case():
    from cupy_paged._bench import peers_paged as PP
    every = list(bench_run.PAGED_PEERS)
    dec = [n for n, _ in PP.specs_for(C.make_case("decode_64x4096"), every)]
    assert dec == ["flashinfer-fa3", "flashinfer-decode", "flashinfer-decode-tc", "cudnn-paged"]
    pre = [n for n, _ in PP.specs_for(C.make_case("mixed"), every)]
    assert pre == ["flashinfer-fa2", "flashinfer-fa3", "cudnn-paged"]
    assert PP.specs_for(C.make_case("mixed"), ["sdpa-flash"]) == []
    assert set(PP.PEER_NAMES) | {PP.CUDNN_PEER} == set(bench_run.PAGED_PEERS)


def test_peers_paged_imports_without_torch_flashinfer_or_cudnn():
    code = ("import sys; import cupy_paged._bench.peers_paged as m; "
            "assert not {'torch', 'flashinfer', 'cudnn'} & set(sys.modules), sys.modules.keys(); "
            "assert callable(m.build_flashinfer) and callable(m.build_cudnn)")
    res = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_help_lists_the_paged_peers():
    res = subprocess.run([sys.executable, "-m", "cupy_paged", "bench", "--help"], cwd=str(ROOT),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for name in ("flashinfer-fa2", "flashinfer-fa3", "flashinfer-decode",
                 "flashinfer-decode-tc", "cudnn-paged", "sdpa-flash", "flex"):
        assert name in "".join(res.stdout.split())      # argparse wraps at the hyphens
    a = bench_run.parse_args(["--peers", "flashinfer-fa3,cudnn-paged,sdpa-cudnn"])
    assert a.peers == ["flashinfer-fa3", "cudnn-paged", "sdpa-cudnn"]
    default = bench_run.parse_args([]).peers
    assert default[:4] == list(bench_run.TORCH_PEERS)      # today's default set is kept
    assert set(default) <= set(bench_run.ALL_PEERS)


def test_fastest_peer_ratio_on_our_rows():
    recs = [
        {"case": "mixed", "block_size": 16, "impl": "ours:flash", "kind": "ours",
         "status": "ok", "ms": 1.0},
        {"case": "mixed", "block_size": 16, "impl": "ours:mea", "kind": "ours",
         "status": "failed", "reason": "boom"},
        {"case": "mixed", "block_size": 16, "impl": "sdpa:flash", "kind": "peer",
         "status": "ok", "ms": 2.0},
        {"case": "mixed", "block_size": 16, "impl": "sdpa:cudnn+gather", "kind": "peer",
         "status": "ok", "ms": 0.8},                                   # +gather counts
        {"case": "mixed", "block_size": 16, "impl": "flashinfer-fa3", "kind": "peer",
         "status": "failed", "reason": "x"},
        {"case": "mixed", "block_size": 256, "impl": "ours:flash", "kind": "ours",
         "status": "ok", "ms": 1.0},
        {"case": "mixed", "block_size": 256, "impl": "flashinfer-fa2", "kind": "peer",
         "status": "ok", "ms": 0.5},
        {"case": "decode_64x4096", "block_size": 16, "impl": "ours:flash", "kind": "ours",
         "status": "ok", "ms": 1.0},                                   # no peer ran
    ]
    out = report.finalize(recs, {})
    flash, mea, sdpa, gath, fi, flash256, fa2, dec = out
    assert flash["fastest_peer"] == "sdpa:cudnn+gather"
    assert flash["vs_fastest"] == pytest.approx(1.25)
    assert mea["vs_fastest"] is None
    assert flash256["fastest_peer"] == "flashinfer-fa2"
    assert flash256["vs_fastest"] == pytest.approx(2.0)                # per block size
    assert dec["fastest_peer"] is None and dec["vs_fastest"] is None
    assert "vs_fastest" not in sdpa and sdpa["ratio"] == pytest.approx(0.5)   # schema kept
    assert flash["vs"] == {"sdpa:flash": pytest.approx(0.5),
                           "sdpa:cudnn+gather": pytest.approx(1.25)}
    assert report.fastest_peers(out) == {("mixed", 16): "sdpa:cudnn+gather",
                                         ("mixed", 256): "flashinfer-fa2"}
    assert "ours/fastest" in report.COLUMNS
    text = report.text_table(out)
    assert "1.25 vs sdpa:cudnn+gather" in next(ln for ln in text.splitlines()
                                               if "ours:flash" in ln and " 16 " in ln)
    md = report.markdown_table(out)
    assert "| 2.00 vs flashinfer-fa2 |" in md
    assert json.loads(json.dumps(out))[0]["fastest_peer"] == "sdpa:cudnn+gather"


def test_reference_rows_with_a_sink(monkeypatch):
    """The --sinks row's reference: a sink of -inf is no sink, a finite one shrinks each row by
    one factor Z / (Z + e^sink), a dominating one sends it to 0 (float32 torch on the CPU)."""
    torch = pytest.importorskip("torch", reason="the reference rows are torch")
    from cupy_paged._bench import peers

    monkeypatch.setattr(peers, "DEVICE", "cpu")
    case = C.Case("tiny", q_lens=(2, 1), past=(3, 0), num_heads=4, kv_num_heads=2,
                  head_size=8, block_size=2, dtype="float32")
    meta = C.build_metadata(case)
    s = peers.make_sets(case, meta, 1)[0]
    rows = [(0, 0), (0, 1), (1, 0)]
    plain = peers.reference_rows(case, meta, s, rows)
    none = peers.reference_rows(case, meta, s, rows, sink=torch.full((4,), -float("inf")))
    some = peers.reference_rows(case, meta, s, rows, sink=torch.tensor([0.5, -1.0, 2.0, 0.0]))
    huge = peers.reference_rows(case, meta, s, rows, sink=torch.full((4,), 80.0))
    for r in rows:
        torch.testing.assert_close(none[r], plain[r])
        ratio = some[r] / plain[r]                       # (N, H): one factor per head
        assert bool(((ratio > 0) & (ratio < 1)).all())
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4, atol=1e-5)
        assert float(huge[r].abs().max()) < 1e-20


def test_sinks_option_adds_a_flash_sink_row():
    pytest.importorskip("torch", reason="the specs name the torch peers' builders")
    from cupy_paged._bench import peers, run

    case = C.make_case("decode_64x4096")
    for argv, want in ((["--peers", ""], ["ours:flash", "ours:mea", "ours:mea-attn"]),
                       (["--peers", "", "--sinks"],
                        ["ours:flash", "ours:flash+sink", "ours:mea", "ours:mea-attn"])):
        args = run.parse_args(argv)
        specs = run._impl_specs(args, case, None, [], peers)
        assert [name for name, _, _ in specs["ours"]] == want


def test_paged_ratio_leaves_out_dense_sdpa_without_its_gather():
    recs = [
        {"case": "mixed", "block_size": 16, "impl": "ours:flash", "kind": "ours",
         "status": "ok", "ms": 1.0},
        {"case": "mixed", "block_size": 16, "impl": "sdpa:cudnn", "kind": "peer",
         "status": "ok", "ms": 0.5},                  # dense, gather untimed: not a paged call
        {"case": "mixed", "block_size": 16, "impl": "sdpa:cudnn+gather", "kind": "peer",
         "status": "ok", "ms": 2.0},
        {"case": "mixed", "block_size": 16, "impl": "flashinfer-fa3", "kind": "peer",
         "status": "ok", "ms": 0.8},
        {"case": "mixed", "block_size": 16, "impl": "flex:paged", "kind": "peer",
         "status": "ok", "ms": 4.0},
    ]
    flash = report.finalize(recs, {})[0]
    assert flash["fastest_peer"] == "sdpa:cudnn" and flash["vs_fastest"] == pytest.approx(2.0)
    assert flash["fastest_paged_peer"] == "flashinfer-fa3"
    assert flash["vs_fastest_paged"] == pytest.approx(1.25)
    assert [report.serves_the_paged_cache(r["impl"]) for r in recs[1:]] == [
        False, True, True, True]
    assert "1.25 vs flashinfer-fa3" in report.text_table(recs)
    assert "ours/paged" in report.COLUMNS
