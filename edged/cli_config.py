"""`edged check-config FILE`: validate the config and check what `edged run` checks at start-up
(models load, TLS and password files, the source, the state directory); print every problem and exit
with the code `edged run` would exit with (edged.exitcodes)."""

from __future__ import annotations

import argparse
import sys

from edged import exitcodes
from edged.config import ConfigError, load_config
from edged.preflight import exit_code, preflight
from edged.secrets import redact_url


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="YAML config file")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing when valid")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return exitcodes.CONFIG
    problems = preflight(cfg, args.file)
    if problems:
        print(f"{args.file}: edged run would refuse this configuration:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return exit_code(problems)
    if not args.quiet:
        source = redact_url(cfg.capture.source) if isinstance(cfg.capture.source, str) else cfg.capture.source
        print(f"{args.file}: OK (device_id={cfg.device_id}, source={source!r})")
    return 0
