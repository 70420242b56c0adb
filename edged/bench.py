"""`edged bench NAME [args]`: run one of the benchmark scripts in bench/ (results go to docs/)."""

from __future__ import annotations

import argparse
import runpy
import sys

from edged.config import PROJECT_ROOT

BENCH_DIR = PROJECT_ROOT / "bench"


def available() -> list:
    return sorted(p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="benchmark to run (omit to list them)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")


def run(args: argparse.Namespace) -> int:
    names = available()
    if not args.name:
        print("benchmarks: " + (", ".join(names) or "(none: bench/ is not present in this install)"))
        return 0
    if args.name not in names:
        print(f"unknown benchmark {args.name!r}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    script = BENCH_DIR / f"bench_{args.name}.py"
    sys.argv = [str(script)] + list(args.args)
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
