"""Bar chart of a benchmark result file: one panel per (case, block size), time per
implementation, ours highlighted. ``python benchmarks/plot.py results.json out.png``."""
from __future__ import annotations

import json
import sys


def plot(doc, path):
    """Draw ``doc`` (the harness's JSON document) into ``path`` (PNG, SVG, ...) with matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {}
    for r in doc["results"]:
        if r.get("status") == "ok":
            panels.setdefault((r["case"], r["block_size"]), []).append(r)
    if not panels:
        raise ValueError("no measured rows to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.2 + 0.32 * max(
        len(rows) for rows in panels.values()) * len(panels)), squeeze=False)
    for ax, ((case, block), rows) in zip(axes[:, 0], panels.items()):
        rows = sorted(rows, key=lambda r: r["ms"])
        colors = ["tab:orange" if r["kind"] == "ours" else "tab:gray" for r in rows]
        ax.barh([r["impl"] for r in rows], [r["ms"] for r in rows], color=colors)
        ax.invert_yaxis()
        ax.set_title(f"{case}, block {block}", fontsize=10, loc="left")
        ax.set_xlabel("ms (lower is better)")
        for i, r in enumerate(rows):
            ax.text(r["ms"], i, f" {r['ms']:.3g}", va="center", fontsize=8)
    fig.suptitle(f"{doc.get('card', '')}, {str(doc.get('date', ''))[:10]}: ours (orange) vs peers",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    """``plot.py RESULTS.json OUT.png`` (argv None: sys.argv[1:]): draw, print the path; 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 2:
        sys.exit("usage: python benchmarks/plot.py RESULTS.json OUT.png")
    with open(argv[0]) as f:
        print(plot(json.load(f), argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
