"""Turn a results JSON (from `python benchmarks/bench.py --json ...`) into its Markdown table and
the PNG plot of the ratios to torch's BatchNorm.

    python benchmarks/render.py benchmarks/results/cpu-2core.json
        -> benchmarks/results/cpu-2core.md and benchmarks/results/cpu-2core.png
    python benchmarks/render.py r.json --md out.md --png out.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import plot_ratios, render_markdown  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="results JSON: a header record and one record per measurement")
    p.add_argument("--md", default=None, help="Markdown output (default: the JSON's name with .md)")
    p.add_argument("--png", default=None, help="plot output (default: the JSON's name with .png)")
    p.add_argument("--print", action="store_true", help="also print the table")
    args = p.parse_args(argv)
    with open(args.json) as f:
        records = json.load(f)
    stem = os.path.splitext(args.json)[0]
    md = args.md or stem + ".md"
    png = args.png or stem + ".png"
    text = render_markdown(records)
    with open(md, "w") as f:
        f.write(text)
    wrote = [md]
    if plot_ratios(records, png):
        wrote.append(png)
    if args.print:
        print(text)
    print("wrote " + ", ".join(wrote))
    return 0


if __name__ == "__main__":
    sys.exit(main())
