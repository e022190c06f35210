"""Results -> numbers per row, the printed table, the Markdown table and the JSON file.

Pure Python (no torch, no GPU): CI tests it with fake timings.

A result record is a dict with at least: case (name), block_size, impl ("ours:flash",
"sdpa:cudnn+gather", ...), kind ("ours" | "peer"), status ("ok" | "unsupported" | "failed" |
"skipped"), and when ok, ms (median). ``finalize`` adds per-row rates and ratios:
  tflops  = case FLOPs / time        gbps = case minimum bytes / time
            (the case's numbers for every implementation, so rows compare work done per
            second; a peer that moves more bytes, e.g. expanded K/V, still gets the case's)
  ratio   on peer rows: ms(fastest of ours that ran on this case) / ms(peer)
            (> 1: ours is that many times slower); None where none of ours ran
  vs      on our rows: {peer impl: ms(ours) / ms(peer)} for every peer that ran
  fastest_peer, vs_fastest
          on our rows: the fastest peer row that ran on this (case, block size) -- rows
          ending in "+gather" count as peers too -- and ms(ours) / ms(that peer) (> 1: ours
          is slower); None where no peer ran or ours did not. The tables show it in the
          "ours/fastest" column as e.g. "1.25 vs flashinfer-fa3".
  fastest_paged_peer, vs_fastest_paged
          the same over the peers that serve a paged cache as it is: every peer row but the
          dense SDPA ones whose gather is not timed ("sdpa:<backend>" without "+gather"),
          which no paged server could run alone; column "ours/paged".
"""
from __future__ import annotations

import json
import os
import re

COLUMNS = ("case", "block", "impl", "ms", "TFLOP/s", "GB/s", "ours/peer", "ours/fastest",
           "ours/paged", "note")


def serves_the_paged_cache(impl):
    """Whether a peer row stands for a complete paged call: not "sdpa:<backend>" alone,
    whose K/V gather from the paged cache is not timed."""
    return not impl.startswith("sdpa:") or impl.endswith("+gather")


def slug(name):
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    s = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")
    return s or "unknown-card"


def short_reason(reason, impl="", width=90):
    """One line of a (possibly multi-line) reason; for ours, the line naming the backend."""
    if not reason:
        return ""
    lines = [ln.strip() for ln in str(reason).splitlines() if ln.strip()]
    backend = impl.split(":", 1)[1] if ":" in impl else ""
    pick = next((ln for ln in lines if backend and ln.startswith(backend + ":")), lines[0])
    return pick if len(pick) <= width else pick[:width - 3] + "..."


def finalize(records, case_numbers):
    """Add tflops, gbps, ratio (peer rows) and vs (our rows) in place; returns records.

    case_numbers: {(case name, block_size): {"flops": F, "min_bytes": B}}.
    """
    by_case = {}
    for r in records:
        by_case.setdefault((r["case"], r["block_size"]), []).append(r)
    for key, rows in by_case.items():
        nums = case_numbers.get(key, {})
        for r in rows:
            if r.get("status") == "ok" and r.get("ms"):
                s = r["ms"] * 1e-3
                r["tflops"] = nums["flops"] / s / 1e12 if "flops" in nums else None
                r["gbps"] = nums["min_bytes"] / s / 1e9 if "min_bytes" in nums else None
        ours = [r for r in rows if r["kind"] == "ours" and r.get("status") == "ok"]
        peers = [r for r in rows if r["kind"] == "peer" and r.get("status") == "ok"]
        best = min((r["ms"] for r in ours), default=None)
        fastest = min(peers, key=lambda p: p["ms"], default=None)
        paged = min((p for p in peers if serves_the_paged_cache(p["impl"])),
                    key=lambda p: p["ms"], default=None)
        for r in rows:
            if r["kind"] == "peer":
                r["ratio"] = (best / r["ms"]) if (best and r.get("status") == "ok") else None
            else:
                r["vs"] = ({p["impl"]: r["ms"] / p["ms"] for p in peers}
                           if r.get("status") == "ok" else {})
                ran = r.get("status") == "ok" and fastest is not None
                r["fastest_peer"] = fastest["impl"] if fastest is not None else None
                r["vs_fastest"] = r["ms"] / fastest["ms"] if ran else None
                ran_paged = r.get("status") == "ok" and paged is not None
                r["fastest_paged_peer"] = paged["impl"] if paged is not None else None
                r["vs_fastest_paged"] = r["ms"] / paged["ms"] if ran_paged else None
    return records


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def fastest_peers(records):
    """{(case, block_size): impl of the fastest ok peer row} (after finalize or not)."""
    best = {}
    for r in records:
        if r["kind"] == "peer" and r.get("status") == "ok" and r.get("ms"):
            key = (r["case"], r["block_size"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    return {k: r["impl"] for k, r in best.items()}


def _vs_fastest(r, field="vs_fastest", peer="fastest_peer"):
    if r["kind"] == "peer" or r.get(field) is None:
        return ""
    return f"{r[field]:.2f} vs {r.get(peer)}"


def table_rows(records):
    """Rows of strings in COLUMNS order."""
    out = []
    for r in records:
        ok = r.get("status") == "ok"
        note = "" if ok else f"{r.get('status')}: {short_reason(r.get('reason'), r['impl'])}"
        if ok and r.get("check") and not r["check"].get("ok", True):
            note = f"CHECK FAILED (rel err {r['check'].get('rel_err', float('nan')):.2e})"
        out.append((
            r["case"], str(r["block_size"]), r["impl"],
            _fmt(r.get("ms") if ok else None, ".4f"),
            _fmt(r.get("tflops") if ok else None, ".1f"),
            _fmt(r.get("gbps") if ok else None, ".0f"),
            _fmt(r.get("ratio"), ".2f") if r["kind"] == "peer" else "",
            _vs_fastest(r),
            _vs_fastest(r, "vs_fastest_paged", "fastest_paged_peer"),
            note))
    return out


def text_table(records):
    """Fixed-width table for the terminal."""
    rows = [COLUMNS] + table_rows(records)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[i].ljust(widths[i]) if i < 3 else row[i].rjust(widths[i])
                 for i in range(len(COLUMNS) - 1)]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  ----")
    return "\n".join(lines)


def markdown_table(records, title=None):
    """A Markdown table (pasteable into README)."""
    lines = []
    if title:
        lines += [title, ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(COLUMNS) - 4) + ["---"]) + "|")
    for row in table_rows(records):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines) + "\n"


def floors_table(case_docs):
    """Per case: FLOPs, bytes and the two floors (from finalize'd case docs)."""
    head = ("case", "block", "GFLOP", "MB", "mem floor ms", "compute floor ms", "floor ms")
    rows = [head]
    for c in case_docs:
        rows.append((c["name"], str(c["block_size"]), f"{c['flops'] / 1e9:.1f}",
                     f"{c['min_bytes'] / 1e6:.1f}", _fmt(c.get("mem_floor_ms"), ".4f"),
                     _fmt(c.get("compute_floor_ms"), ".4f"), _fmt(c.get("floor_ms"), ".4f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(r[i].ljust(widths[i]) if i < 2 else r[i].rjust(widths[i])
                               for i in range(len(head))) for r in rows)


def write(doc, out_dir):
    """Write <out_dir>/<slug>.json and <slug>.md; returns (json path, md path)."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, doc.get("slug") or slug(doc.get("card", "")))
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
    with open(base + ".md", "w") as f:
        f.write(doc.get("markdown", markdown_table(doc.get("results", []))))
    return base + ".json", base + ".md"
