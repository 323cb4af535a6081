"""Command line: `python -m normkernels bench [...]` and `python -m normkernels study [...]`."""
from __future__ import annotations

import sys

USAGE = "usage: python -m normkernels {bench,study} [options]   (add --help after the command)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from .bench import main as run
    elif command == "study":
        from .study import main as run
    else:
        print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
