"""`edged config [--config FILE] [--overlay FILE]`: print the effective config as YAML."""

from __future__ import annotations

import argparse
import sys

import yaml

from edged.config import ConfigError, config_to_dict, load_config, parse_yaml


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    p.add_argument("--overlay", help="YAML/JSON partial config applied on top (as a remote overlay is)")


def run(args: argparse.Namespace) -> int:
    try:
        overlay = None
        if args.overlay:
            with open(args.overlay, encoding="utf-8") as fh:
                overlay, _ = parse_yaml(fh.read(), args.overlay)
        cfg = load_config(args.config, overlay=overlay)
    except (ConfigError, OSError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return 0
