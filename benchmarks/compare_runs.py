"""Our rows of two or more ``run.py`` JSON files side by side: time per (case, block size,
implementation) in each, and each run's time over the first's (e.g. a commit against the one
before it, measured in one device call).

    python benchmarks/compare_runs.py before.json after.json [more.json ...]
"""
from __future__ import annotations

import json
import sys


def rows(path):
    """{(case, block_size, impl): ms} of one run's successful rows."""
    data = json.loads(open(path).read())
    return {(r["case"], r["block_size"], r["impl"]): r["ms"] for r in data["results"]
            if r.get("status") == "ok" and r.get("ms")}


def main(paths):
    runs = [rows(p) for p in paths]
    keys = [k for k in runs[0] if all(k in r for r in runs[1:])]
    head = "".join(f" {'run ' + str(i):>9s}" for i in range(len(runs)))
    ratios = "".join(f" {str(i) + '/0':>6s}" for i in range(1, len(runs)))
    print(f"{'case':16s} {'bs':>4s} {'impl':18s}{head}{ratios}")
    for key in keys:
        ms = [r[key] for r in runs]
        print(f"{key[0]:16s} {key[1]:4d} {key[2]:18s}" + "".join(f" {m:9.4f}" for m in ms)
              + "".join(f" {m / ms[0]:6.3f}" for m in ms[1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
