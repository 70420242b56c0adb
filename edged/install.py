"""`edged install-service`: install the systemd unit, a config in /etc/edged and the service user."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from edged.config import PROJECT_ROOT

UNIT_TEMPLATE = PROJECT_ROOT / "systemd" / "edged.service"


def render_unit(edged_bin: str, template: Path = UNIT_TEMPLATE) -> str:
    return template.read_text().replace("@EDGED_BIN@", edged_bin)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unit-dir", default="/etc/systemd/system", help="where the unit goes")
    p.add_argument("--config-dir", default="/etc/edged", help="where edged.yaml goes (kept if present)")
    p.add_argument("--user", default="edged", help="service user (created when missing)")
    p.add_argument("--no-enable", action="store_true", help="install only; do not enable and start")
    p.add_argument("--dry-run", action="store_true", help="print the unit and the steps, change nothing")


def _sh(cmd: list, dry: bool) -> None:
    print("+ " + " ".join(cmd))
    if not dry:
        subprocess.run(cmd, check=True)


def run(args: argparse.Namespace) -> int:
    edged_bin = shutil.which("edged") or str(Path(sys.executable).with_name("edged"))
    unit = render_unit(edged_bin)
    unit_path = Path(args.unit_dir) / "edged.service"
    conf_dir = Path(args.config_dir)
    if args.dry_run:
        print(f"# {unit_path}\n{unit}")
    else:
        unit_path.parent.mkdir(parents=True, exist_ok=True)
        unit_path.write_text(unit)
        conf_dir.mkdir(parents=True, exist_ok=True)
        target = conf_dir / "edged.yaml"
        if not target.exists():
            example = (PROJECT_ROOT / "config" / "edged.yaml").read_text()
            # Under systemd the state lives in StateDirectory and models next to the source tree.
            example = example.replace("state_dir: state", "state_dir: /var/lib/edged")
            example = example.replace("model: models/", f"model: {PROJECT_ROOT / 'models'}/")
            target.write_text(example)
        print(f"wrote {unit_path}; config {target}")
    if subprocess.run(["id", args.user], capture_output=True).returncode != 0:
        _sh(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--groups", "video", args.user], args.dry_run)
    _sh(["systemctl", "daemon-reload"], args.dry_run)
    if not args.no_enable:
        _sh(["systemctl", "enable", "--now", "edged.service"], args.dry_run)
    return 0
