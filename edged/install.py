"""`edged install-service`: the service user, /etc/edged/edged.yaml and the systemd unit.

Every step is planned first and printed; `--dry-run` stops there. `--root DIR` installs into another
root tree (an SD-card image being prepared, or a test): files go under DIR, `useradd --root DIR` and
`systemctl --root DIR enable` act on it, and nothing is started.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from edged.config import PACKAGE_DIR, ConfigError, build_config, parse_yaml
from edged.secrets import redact_url

DATA_DIR = PACKAGE_DIR / "data"
UNIT_TEMPLATE = DATA_DIR / "edged.service"  # equal to the repository's systemd/edged.service
EXAMPLE_CONFIG = DATA_DIR / "edged.yaml"  # equal to the repository's config/edged.yaml
UNIT_NAME = "edged.service"
STATE_DIR = "/var/lib/edged"
DEFAULT_SOURCE = "/dev/video0"
UNIT_MODE = 0o644
CONFIG_DIR_MODE = 0o750  # root:edged, as the unit's ConfigurationDirectoryMode= says
STATE_DIR_MODE = 0o700  # the unit's StateDirectoryMode=
CONFIG_FILE_MODE = 0o640  # root:edged: the service reads it, nobody else (it may hold credentials)
# Cameras (video), USB Edge TPUs (plugdev, Coral's udev rule), PCIe Edge TPUs (apex): the service user
# joins those of them that exist.
DEVICE_GROUPS = ("video", "plugdev", "apex")
# A system service cannot run code from here: the unit has ProtectHome=yes, and Debian 12 / Raspberry Pi
# OS home directories are 0700 anyway.
PRIVATE_DIRS: Tuple[Path, ...] = (Path("/home"), Path("/root"), Path("/run/user"))


class InstallError(Exception):
    pass


def render_unit(edged_bin: str, template: Path = UNIT_TEMPLATE) -> str:
    if any(c.isspace() for c in edged_bin):
        raise InstallError(f"the launcher path {edged_bin!r} contains white space, which ExecStart= cannot take; "
                           "install edged in a path without spaces (e.g. /opt/edged)")
    return template.read_text().replace("@EDGED_BIN@", edged_bin.replace("%", "%%"))  # % starts a specifier


def find_edged_bin(argv0: Optional[str] = None, executable: Optional[str] = None) -> Path:
    """The `edged` launcher of this installation as an absolute path. Never from PATH: `sudo` resets PATH,
    so a venv that is only on the user's PATH is found through the running program instead."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = sys.executable if executable is None else executable
    candidates = []
    if Path(argv0).name == "edged":
        candidates.append(Path(os.path.abspath(argv0)))
    # Not resolved: a venv's bin/python is a symlink to the system interpreter, its launcher sits beside it.
    candidates.append(Path(os.path.abspath(executable)).parent / "edged")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise InstallError(f"cannot find the edged launcher (tried {tried}); run the installer as "
                       "/path/to/venv/bin/edged install-service")


def unreachable_paths(paths: Sequence[Path], private: Sequence[Path] = ()) -> List[Path]:
    """The paths a system service user cannot reach (inside a home directory)."""
    private = tuple(private) or PRIVATE_DIRS
    return [p for p in paths if any(p == d or d in p.parents for d in private)]


def service_paths(edged_bin: Path) -> List[Path]:
    """What the service runs and reads: the launcher, the interpreter, the package (with its models)."""
    return list(dict.fromkeys([edged_bin, edged_bin.resolve(), Path(sys.executable).resolve(), PACKAGE_DIR]))


def parse_source(text: str) -> Union[int, str]:
    text = text.strip()
    if not text:
        raise InstallError("--source is empty: give a camera index, /dev/videoN, a file or a URL")
    return int(text) if text.isdigit() else text


def service_config(example: str, source: Union[int, str]) -> str:
    """The example config with what a service needs: the camera instead of the demo (which ends, so the
    service would stop), the state in the unit's StateDirectory. Model paths stay relative: they resolve
    to the installed package's models."""
    text, n_src = re.subn(r"(?m)^(  source:) .*$", lambda m: f"{m.group(1)} {json.dumps(source)}", example, count=1)
    text, n_state = re.subn(r"(?m)^state_dir: .*$", f"state_dir: {STATE_DIR}", text, count=1)
    if n_src != 1 or n_state != 1:
        raise InstallError(f"{EXAMPLE_CONFIG}: no 'capture.source' / 'state_dir' line to set")
    try:
        data, root = parse_yaml(text, "edged.yaml")
        build_config(data, "edged.yaml", root)
    except ConfigError as exc:
        raise InstallError(f"the service config would be invalid: {exc}") from None
    return text


def existing_source(conf: Path) -> Union[int, str, None]:
    """capture.source of an existing config (None when unreadable or unset)."""
    try:
        data = yaml.safe_load(conf.read_text(encoding="utf-8")) or {}
        return (data.get("capture") or {}).get("source", "demo")  # absent = the default, the demo
    except (OSError, yaml.YAMLError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------- the system
def read_group_file(root: Path) -> Dict[str, Tuple[int, List[str]]]:
    """name -> (gid, members) from ROOT/etc/group (local groups; those are what useradd manages)."""
    path = root / "etc" / "group"
    groups: Dict[str, Tuple[int, List[str]]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split(":")
            if len(parts) >= 4 and parts[2].isdigit():
                groups[parts[0]] = (int(parts[2]), [m for m in parts[3].split(",") if m])
    return groups


def user_exists(root: Path, user: str) -> bool:
    path = root / "etc" / "passwd"
    return path.exists() and any(line.split(":", 1)[0] == user for line in path.read_text().splitlines())


@dataclass
class Step:
    text: str
    action: Callable[[], None]
    detail: str = ""


@dataclass
class Plan:
    steps: List[Step] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def add(self, text: str, action: Callable[[], None], detail: str = "") -> None:
        self.steps.append(Step(text, action, detail))


def _command(cmd: List[str]) -> Callable[[], None]:
    def run() -> None:
        subprocess.run(cmd, check=True)

    return run


def _write_file(path: Path, text: str, mode: int, group: Optional[Tuple[Path, str]] = None) -> Callable[[], None]:
    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".edged-new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)  # whatever the umask
            if group is not None:
                os.fchown(fd, 0, _gid(*group))
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)

    return write


def _make_dir(path: Path, mode: int, group: Tuple[Path, str]) -> Callable[[], None]:
    def make() -> None:
        path.mkdir(parents=True, exist_ok=True)
        _set_owner_mode(path, mode, group)()

    return make


def _set_owner_mode(path: Path, mode: int, group: Tuple[Path, str]) -> Callable[[], None]:
    def set_() -> None:
        os.chown(path, 0, _gid(*group))
        os.chmod(path, mode)

    return set_


def _make_state_dir(path: Path, root: Path, user: str) -> Callable[[], None]:
    """What the unit's StateDirectory= does at each start (owner the service user, 0700), done once
    now: `sudo -u edged edged check-config` and an image prepared with --root find it before the
    service has ever started."""
    def make() -> None:
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, *_uid_gid(root, user))
        os.chmod(path, STATE_DIR_MODE)

    return make


def _uid_gid(root: Path, name: str) -> Tuple[int, int]:
    """The user's id and primary group id from ROOT/etc/passwd."""
    for line in (root / "etc" / "passwd").read_text().splitlines():
        parts = line.split(":")
        if parts[0] == name and len(parts) > 3:
            return int(parts[2]), int(parts[3])
    raise InstallError(f"user {name!r} does not exist in {root / 'etc' / 'passwd'}")


def _gid(root: Path, name: str) -> int:
    groups = read_group_file(root)
    if name not in groups:
        raise InstallError(f"group {name!r} does not exist in {root / 'etc' / 'group'}")
    return groups[name][0]


def plan_install(args: argparse.Namespace, edged_bin: Path, ask: Callable[[str], str]) -> Plan:
    root = Path(args.root)
    inside = lambda p: root / Path(p).relative_to("/")  # noqa: E731
    plan = Plan()
    user = args.user
    groups = read_group_file(root)
    device_groups = [g for g in DEVICE_GROUPS if g in groups]

    # 1. the service user (its own group owns the config)
    root_opt = ["--root", str(root)] if root != Path("/") else []
    if not user_exists(root, user):
        cmd = ["useradd", *root_opt, "--system", "--user-group", "--home-dir", STATE_DIR, "--no-create-home",
               "--shell", "/usr/sbin/nologin"]
        if device_groups:
            cmd += ["--groups", ",".join(device_groups)]
        plan.add("+ " + " ".join(cmd + [user]), _command(cmd + [user]))
    else:
        missing = [g for g in device_groups if user not in groups[g][1]]
        if missing:
            cmd = ["usermod", *root_opt, "--append", "--groups", ",".join(missing), user]
            plan.add("+ " + " ".join(cmd), _command(cmd))
        else:
            plan.notes.append(f"user {user} exists (groups: {', '.join(device_groups) or 'none'})")

    # 2. /etc/edged and the config
    conf_dir = inside(args.config_dir)
    conf = conf_dir / "edged.yaml"
    owner = (root, user)
    plan.add(f"{'set' if conf_dir.exists() else 'mkdir'} {conf_dir} (mode {CONFIG_DIR_MODE:04o}, root:{user})",
             _make_dir(conf_dir, CONFIG_DIR_MODE, owner))
    if conf.exists():
        plan.notes.append(f"keeping the existing {conf} (not overwritten"
                          + ("; --source ignored)" if args.source is not None else ")"))
        if existing_source(conf) == "demo":  # what older installers wrote: the service would stop after 20 s
            plan.notes.append(f"warning: {conf} still has capture.source: demo; put your camera there "
                              "(or move the file away and run the installer again with --source)")
        st = conf.stat()
        gid = groups.get(user, (None,))[0]
        if (st.st_mode & 0o7777) != CONFIG_FILE_MODE or st.st_uid != 0 or (gid is not None and st.st_gid != gid):
            # An older install wrote it world-readable; it may hold credentials.
            plan.add(f"set {conf} to mode {CONFIG_FILE_MODE:04o}, root:{user} (was {st.st_mode & 0o7777:04o}, "
                     f"uid {st.st_uid} gid {st.st_gid})", _set_owner_mode(conf, CONFIG_FILE_MODE, owner))
    else:
        if args.source is not None:
            source = parse_source(args.source)
        else:
            answer = ask(f"Camera for the service (index, /dev/videoN or rtsp:// URL) [{DEFAULT_SOURCE}]: ")
            source = parse_source(answer) if answer.strip() else DEFAULT_SOURCE
        text = service_config(EXAMPLE_CONFIG.read_text(), source)
        plan.add(f"write {conf} (mode {CONFIG_FILE_MODE:04o}, root:{user})", _write_file(conf, text, CONFIG_FILE_MODE, owner),
                 detail=f"  from {EXAMPLE_CONFIG}\n  capture.source: {redact_url(str(source))}\n  state_dir: {STATE_DIR}")
        if source == "demo":
            plan.notes.append("warning: the demo scene ends after 20 seconds and the service then stops; give a camera")
        elif isinstance(source, str) and source.startswith("/dev/") and not Path(source).exists():
            plan.notes.append(f"note: {source} does not exist now; the service keeps retrying until it appears")

    # 3. the state directory
    state_dir = inside(STATE_DIR)
    plan.add(f"{'set' if state_dir.exists() else 'mkdir'} {state_dir} (mode {STATE_DIR_MODE:04o}, owner {user})",
             _make_state_dir(state_dir, root, user))

    # 4. the unit
    unit_path = inside(args.unit_dir) / UNIT_NAME
    unit = render_unit(str(edged_bin))
    plan.add(f"{'replace' if unit_path.exists() else 'write'} {unit_path} (mode {UNIT_MODE:04o})",
             _write_file(unit_path, unit, UNIT_MODE), detail="".join("  | " + line + "\n" for line in unit.splitlines()).rstrip("\n"))

    # 5. systemd
    if root != Path("/"):
        if not args.no_enable:
            cmd = ["systemctl", "--root", str(root), "enable", UNIT_NAME]
            plan.add("+ " + " ".join(cmd), _command(cmd))
    else:
        plan.add("+ systemctl daemon-reload", _command(["systemctl", "daemon-reload"]))
        if not args.no_enable:
            cmd = ["systemctl", "enable", "--now", UNIT_NAME]
            plan.add("+ " + " ".join(cmd), _command(cmd))
    return plan


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", help=f"the camera the service watches (index, /dev/videoN, file or URL); asked on a "
                                    f"terminal, else {DEFAULT_SOURCE}. Only used when the config is new")
    p.add_argument("--root", default="/", help="install into this root directory instead of / (an image being "
                                               "prepared): useradd/systemctl act on it, nothing is started")
    p.add_argument("--unit-dir", default="/etc/systemd/system", help="where the unit goes (inside --root)")
    p.add_argument("--config-dir", default="/etc/edged", help="where edged.yaml goes (inside --root; an existing one is kept)")
    p.add_argument("--user", default="edged", help="service user (created when missing)")
    p.add_argument("--no-enable", action="store_true", help="install only; do not enable and start")
    p.add_argument("--dry-run", action="store_true", help="print every step (and the unit), change nothing")
    p.add_argument("--force", action="store_true", help="install even if edged lies in a home directory, "
                                                        "which the service cannot reach")


def _ask_on_terminal(prompt: str) -> str:
    if not sys.stdin.isatty():
        return ""
    try:
        return input(prompt)
    except EOFError:
        return ""


def run(args: argparse.Namespace, ask: Callable[[str], str] = _ask_on_terminal) -> int:
    try:
        edged_bin = find_edged_bin()
        blocked = unreachable_paths(service_paths(edged_bin))
        problem = (
            f"edged is installed under a home directory ({', '.join(map(str, blocked))}): the service "
            "cannot run it from there (ProtectHome=yes, and home directories are private).\n"
            "Install it system-wide, then run the installer from there, e.g.:\n"
            "  sudo /usr/bin/python3 -m venv /opt/edged\n"
            f"  sudo /opt/edged/bin/pip install {_install_spec()}\n"
            "  sudo /opt/edged/bin/edged install-service --source /dev/video0")
        if blocked and not args.force:
            if not args.dry_run:
                raise InstallError(problem)
            print(f"warning: {problem}\n(the real install refuses this without --force)", file=sys.stderr)
        render_unit(str(edged_bin))  # a launcher path the unit cannot take fails here, before any change
        if not args.dry_run and os.geteuid() != 0:
            raise InstallError(f"needs root: sudo {edged_bin} install-service ...")
        plan = plan_install(args, edged_bin, ask)
    except InstallError as exc:
        print(f"edged install-service: {exc}", file=sys.stderr)
        return 1
    print(f"edged install-service{' (dry run: nothing is changed)' if args.dry_run else ''}")
    print(f"  launcher: {edged_bin}")
    for step in plan.steps:
        print(step.text)
        if step.detail and args.dry_run:
            print(step.detail)
        if not args.dry_run:
            try:
                step.action()
            except (OSError, subprocess.CalledProcessError, InstallError) as exc:
                print(f"edged install-service: failed: {step.text}: {exc}", file=sys.stderr)
                return 1
    for note in plan.notes:
        print(note)
    return 0


def _install_spec() -> str:
    """What to pip-install: this source checkout when there is one."""
    checkout = PACKAGE_DIR.parent
    return str(checkout) if (checkout / "pyproject.toml").exists() else "edged  # or the wheel you installed"
