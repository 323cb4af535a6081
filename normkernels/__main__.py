"""Command line: `python -m normkernels study [options]` (also the `normkernels` script). The
benchmarks are a development tool outside the package: `python benchmarks/bench.py`."""
from __future__ import annotations

import sys

COMMANDS = {
    "study": ("the representation study: BN, BN+SBN, L2BN and no norm on a small CNN", "study"),
}
USAGE = "usage: python -m normkernels [-h] [--version] {" + ",".join(COMMANDS) + "} [options]"
HELP = "\n".join(
    [USAGE, "", "Fused normalization layers (L2BN, SBN, BN+SBN) for PyTorch.", "", "commands:"]
    + [f"  {name:<8}{text}" for name, (text, _) in COMMANDS.items()]
    + ["", "options:", "  -h, --help  show this help and exit", "  --version   show the version and exit", "",
       "`python -m normkernels COMMAND --help` lists a command's options."])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(HELP, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(HELP)
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"normkernels {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"normkernels: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    extra = COMMANDS[command][1]
    try:
        from .study import main as run
        return run(rest) or 0
    except ModuleNotFoundError as e:
        # an optional dependency of the command (pip install 'normkernels[<extra>]' brings them)
        if e.name is None or e.name.split(".")[0] in ("normkernels", "torch"):
            raise
        message = str(e) if "normkernels[" in str(e) else (
            f"needs the package {e.name!r}, which is not installed: pip install 'normkernels[{extra}]'")
        print(f"normkernels {command}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
