"""`edged` command line.

Each subcommand lives in the module that does the work: the module provides
`add_arguments(parser)` and `run(args) -> int`, and is imported only when that command runs, so
a command starts fast and the optional dependencies of the others (TensorFlow, motmetrics) stay optional.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from typing import List, Optional

from edged import __version__

# What a shell reports for a program killed by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 128 + int(signal.SIGPIPE)

# name -> (module, one-line help)
COMMANDS = {
    "run": ("edged.service", "run the daemon"),
    "check-config": ("edged.cli_config", "validate a config file and check what `run` checks at start-up (exit 0 when it can start)"),
    "config": ("edged.cli_config_show", "print the effective config (defaults + file + overlay)"),
    "models": ("edged.inference.cli", "inspect, convert and build models"),
    "mot": ("edged.tracking.mot", "run the tracker on MOTChallenge detections"),
    "eval": ("edged.tracking.evaluate", "score MOTChallenge results against ground truth"),
    "watch": ("edged.watch", "print the MQTT messages of a device as they arrive"),
    "demo-scene": ("edged.scene", "render the synthetic demo scene to a video + MOT ground truth"),
    "bench": ("edged.bench", "run the benchmarks"),
    "replay": ("edged.replay", "run the daemon on recorded detections (no camera, no models)"),
    "install-service": ("edged.install", "install the systemd unit"),
}


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edged", description="Edge tracking daemon: camera -> detect -> track -> MQTT.")
    parser.add_argument("--version", action="version", version=f"edged {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    try:
        try:
            code = _dispatch(list(sys.argv[1:] if argv is None else argv))
        except SystemExit:  # argparse's --help, --version and usage errors
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's exit flush
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`edged models info x | head`): stop quietly, as a program killed by
        # SIGPIPE would. stdout points at /dev/null so the exit-time flush cannot raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _dispatch(argv: List[str]) -> int:
    # Import only the module of the command being run (cheap start, optional deps stay optional).
    command = next((a for a in argv if not a.startswith("-")), None)
    only = command if command in COMMANDS else "__none__"
    parser = build_parser(only=only)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
