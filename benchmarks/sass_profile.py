"""Summarise ncu's per-instruction source counters for one kernel: executed instructions per
HMMA, the opcode mix, the stall reasons, the hottest instructions, and the code grouped by how
often it ran (the loop body, the copy loop, the once-per-warp code each show up as one group).

    ncu --clock-control none -k regex:flash_fwd --launch-skip 2 --launch-count 1 --set full \\
        -o prefill python benchmarks/profile_case.py --case prefill_8x2048 --backend flash
    ncu -i prefill.ncu-rep --page source --csv --print-source sass > prefill-sass.csv
    python benchmarks/sass_profile.py prefill-sass.csv

Executed counts, not a static count of the machine code: a static count takes a rolled loop's
body once and leaves out the per-CTA code (benchmarks/NOTES.md, session 4). No GPU needed.
"""
from __future__ import annotations

import argparse
import collections
import csv
import re
import sys
from dataclasses import dataclass

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


@dataclass(frozen=True)
class Instruction:
    address: str
    source: str       # the SASS text, e.g. "@P0 HMMA.16816.F32 R4, R8, R12, R4"
    executed: int     # warp-level executions
    samples: int      # stall samples (all)
    stalls: dict      # reason ("wait", "long_sb", ...) -> samples

    @property
    def opcode(self):
        """The opcode without predicate and modifiers: "HMMA", "LDSM", ..."""
        text = re.sub(r"^@!?U?P\w+\s+", "", self.source.strip())
        return text.split()[0].split(".")[0] if text else "?"


def read(path_or_lines):
    """The kernel's name and its instructions from ncu's ``--page source --csv`` output (the
    first line names the kernel, the second is the header)."""
    if isinstance(path_or_lines, list):
        lines = path_or_lines
    else:
        with open(path_or_lines) as f:
            lines = f.read().splitlines()
    rows = list(csv.reader(lines))
    kernel = rows[0][1] if len(rows[0]) > 1 else rows[0][0]
    header = rows[1]
    col = {name: i for i, name in enumerate(header)}
    for need in ("Address", "Source", SAMPLES, EXECUTED):
        if need not in col:
            raise ValueError(f"not ncu source-page CSV: no column {need!r} in {header[:6]}...")
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]

    def number(row, name):
        try:
            return int(float(row[col[name]]))
        except (ValueError, IndexError):
            return 0

    out = [Instruction(row[col["Address"]], row[col["Source"]], number(row, EXECUTED),
                       number(row, SAMPLES), {r[6:]: number(row, r) for r in reasons})
           for row in rows[2:] if len(row) > col["Source"]]
    return kernel, out


def summary(instructions, top=12, groups=8):
    """The report's lines."""
    executed = sum(i.executed for i in instructions)
    samples = sum(i.samples for i in instructions) or 1
    by_op = collections.Counter()
    samples_by_op = collections.Counter()
    stalls = collections.Counter()
    for i in instructions:
        by_op[i.opcode] += i.executed
        samples_by_op[i.opcode] += i.samples
        stalls.update(i.stalls)
    hmma = by_op.get("HMMA", 0)
    lines = [f"executed instructions {executed:,}, stall samples {samples:,}"]
    if hmma:
        lines.append(f"HMMA {hmma:,}: {executed / hmma:.2f} instructions per HMMA")
    lines.append("opcodes (executed, per HMMA, share of stall samples):")
    for op, n in by_op.most_common(top):
        per = f"{n / hmma:6.2f}" if hmma else "     -"
        lines.append(f"  {op:8s} {n / 1e6:9.2f} M {per}  {100 * samples_by_op[op] / samples:5.1f} %")
    lines.append("stall reasons (share of samples):")
    for reason, n in stalls.most_common(top):
        if n:
            lines.append(f"  {reason:20s} {100 * n / samples:5.1f} %")
    lines.append("hottest instructions (samples, executions, top two reasons):")
    for i in sorted(instructions, key=lambda i: -i.samples)[:top]:
        why = ", ".join(f"{r} {n}" for r, n in sorted(i.stalls.items(), key=lambda x: -x[1])[:2])
        lines.append(f"  {i.address[-6:]} {i.samples:6d} {i.executed:10,d}  "
                     f"{i.source.strip()[:56]:56s} {why}")
    lines.append("code grouped by execution count (instructions x count, share of samples):")
    grouped = collections.defaultdict(lambda: [0, 0, collections.Counter()])
    for i in instructions:
        if i.executed:
            g = grouped[i.executed]
            g[0] += 1
            g[1] += i.samples
            g[2][i.opcode] += 1
    for count, (n, s, ops) in sorted(grouped.items(), key=lambda kv: -kv[1][1])[:groups]:
        mix = " ".join(f"{op} {k}" for op, k in ops.most_common(5))
        lines.append(f"  {n:5d} x {count:10,d} = {n * count / 1e6:8.2f} M  "
                     f"{100 * s / samples:5.1f} %  {mix}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("csv", help="ncu -i REPORT --page source --csv --print-source sass output")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--groups", type=int, default=8)
    args = p.parse_args(argv)
    kernel, instructions = read(args.csv)
    print(kernel)
    print("\n".join(summary(instructions, args.top, args.groups)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
