"""``python -m cupy_paged <command>``: ``bench`` runs the benchmark harness of a checkout."""
from __future__ import annotations

import sys

COMMANDS = {"bench": "run the benchmark harness (see benchmarks/NOTES.md); --help for options"}


def main(argv=None):
    """Dispatch ``argv`` (list of str; None: sys.argv[1:]) to a command; returns an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:8s} {what}" for name, what in COMMANDS.items())
        print(f"usage: python -m cupy_paged <command> [options]\n\ncommands:\n{usage}",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from . import bench
    return bench.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
