"""``python -m cupy_paged <command>``: ``info``, ``precompile`` and ``bench``."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "info": "GPU, CuPy, NVRTC/CUDA/CUTLASS versions, kernel cache, and which backends run here",
    "precompile": "compile the kernels a model needs (or --all) before its first call",
    "bench": "time the backends against torch peers (benchmark harness); --help for options",
}
# The module whose main(argv) runs each command, imported only when it is asked for.
MODULES = {"info": "cupy_paged.info", "precompile": "cupy_paged._precompile",
           "bench": "cupy_paged.bench"}


def main(argv=None):
    """Dispatch ``argv`` (list of str; None: sys.argv[1:]) to a command; returns an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        asked_help = bool(argv) and argv[0] in ("-h", "--help")
        usage = "\n".join(f"  {name:11s} {what}" for name, what in COMMANDS.items())
        unknown = (f"python -m cupy_paged: unknown command {argv[0]!r} (expected one of "
                   f"{', '.join(COMMANDS)})\n\n" if argv and not asked_help else "")
        print(f"{unknown}usage: python -m cupy_paged <command> [options]\n\ncommands:\n"
              f"{usage}\n\npython -m cupy_paged <command> --help describes a command's "
              "options.", file=sys.stdout if asked_help else sys.stderr)
        return 0 if asked_help else 2
    return importlib.import_module(MODULES[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
