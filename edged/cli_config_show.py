"""`edged config [show] [--config FILE] [--overlay FILE]`: print the effective config as YAML.

Actions live in ACTIONS: name -> (add_arguments, run, help); `edged config` alone runs `show`. Another
action (e.g. `push` for remote config) is one more line there. The layers that make the effective
config are gathered in `effective_config`, the one place a new layer (the remote overlay applied from
the state directory) is added.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Dict, Optional, Tuple

import yaml

from edged.config import ConfigError, EdgedConfig, config_to_dict, load_config, parse_yaml

DEFAULT_ACTION = "show"


def _common_args(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """--config for every action; given to the actions too so it may come before or after the action.
    `suppress` keeps an action's copy from resetting a value given before the action name."""
    default = argparse.SUPPRESS if suppress else None
    p.add_argument("--config", "-c", metavar="FILE", default=default,
                   help="YAML config file (default: built-in defaults)")


def _show_args(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    p.add_argument("--overlay", metavar="FILE", default=argparse.SUPPRESS if suppress else None,
                   help="a YAML or JSON file holding a partial config (same keys as the config file), "
                        "applied on top of it as a remote overlay is")
    p.add_argument("--effective", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="include the remote overlay the device applied (from state_dir): what `edged run` "
                        "starts on, with its effective_hash as in config/reported")


def read_overlay(path: str) -> Dict[str, Any]:
    """A partial config from a YAML (or JSON, which is YAML) file. Raises ConfigError."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(path, [f"--overlay: cannot read the file: {exc.strerror or exc}"]) from None
    overlay, _ = parse_yaml(text, path)
    return overlay


def effective_config(config: Optional[str], overlay_file: Optional[str] = None, *,
                     remote: bool = False) -> Tuple[EdgedConfig, str]:
    """Defaults + config file + overlay file (+ with `remote`, the remote overlay persisted in the state
    directory, exactly as `edged run` starts), validated; and a one-line description of the layers.
    Raises ConfigError."""
    overlay = read_overlay(overlay_file) if overlay_file else None
    cfg = load_config(config, overlay=overlay)
    if not remote:
        return cfg, "defaults + file" + (" + overlay" if overlay else "")
    from edged.config import resolve_state_dir
    from edged.remote_config import OVERLAY_FILE, OverlayStore
    from edged.remote_config import effective_config as with_remote

    store = OverlayStore.load(resolve_state_dir(cfg, config) / OVERLAY_FILE)
    cfg = with_remote(config, overlay, store)
    return cfg, f"defaults + file{' + overlay' if overlay else ''} + remote overlay {store.versions}"


def _show(args: argparse.Namespace) -> int:
    from edged.remote_config import config_hash

    try:
        cfg, layers = effective_config(getattr(args, "config", None), getattr(args, "overlay", None),
                                       remote=bool(getattr(args, "effective", False)))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    sys.stdout.write(f"# {layers}\n# effective_hash: {config_hash(cfg)}\n")
    sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return 0


def _push(args: argparse.Namespace) -> int:
    from edged.cli_config_push import run as push

    return push(args)


def _push_args(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    from edged.cli_config_push import add_arguments

    add_arguments(p, suppress=suppress)


Action = Tuple[Callable[..., None], Callable[[argparse.Namespace], int], str]
ACTIONS: Dict[str, Action] = {
    "show": (_show_args, _show, "print the effective config (defaults + file + overlay), secrets redacted"),
    "push": (_push_args, _push, "publish a desired overlay to a device (or the fleet) and wait for its report"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    ACTIONS[DEFAULT_ACTION][0](p)  # `edged config --overlay F` = `edged config show --overlay F`
    sub = p.add_subparsers(dest="config_action", metavar="ACTION", help=f"default: {DEFAULT_ACTION}")
    for name, (add, _run, help_text) in ACTIONS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        _common_args(sp, suppress=True)
        add(sp, suppress=True)


def run(args: argparse.Namespace) -> int:
    return ACTIONS[getattr(args, "config_action", None) or DEFAULT_ACTION][1](args)
