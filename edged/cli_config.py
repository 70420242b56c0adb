"""`edged check-config FILE`: validate, print every problem, exit non-zero when any."""

from __future__ import annotations

import argparse
import sys

from edged.config import ConfigError, load_config, resolve_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="YAML config file")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing when valid")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    warnings = []
    for section in ("detector", "encoder"):
        model = getattr(cfg, section).model
        if section == "encoder" and not cfg.encoder.enabled:
            continue
        path = resolve_path(model, args.file)
        if not path.is_file():
            warnings.append(f"{section}.model: file not found: {path}")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not args.quiet:
        print(f"{args.file}: OK (device_id={cfg.device_id}, source={cfg.capture.source!r})")
    return 0
