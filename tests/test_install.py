"""`edged install-service` for real, into a temporary root tree (--root): real useradd / systemctl on
that tree, real files and modes; nothing on this machine's /etc is touched."""

from __future__ import annotations

import argparse
import os
import pty
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edged import install
from edged.config import PACKAGE_DIR, load_config, resolve_path
from tests.conftest import ROOT, missing

# What sudo leaves (Debian's secure_path): a venv that was only on the user's PATH is not on it.
SUDO_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _need_root() -> None:
    if os.geteuid() != 0:
        missing("needs root (useradd --root); CI runs as root")


def make_root(tmp_path: Path, groups=("video", "plugdev")) -> Path:
    """A minimal root tree: the account files useradd needs, and some device groups."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    gids = {"video": 44, "plugdev": 46, "apex": 120}
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc" / "group").write_text("root:x:0:\n" + "".join(f"{g}:x:{gids[g]}:\n" for g in groups))
    (root / "etc" / "gshadow").write_text("root:*::\n" + "".join(f"{g}:*::\n" for g in groups))
    return root


def edged_cmd(*args: str, env_path: str = SUDO_PATH, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=env_path)
    return subprocess.run([sys.executable, "-m", "edged", "install-service", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, stdin=stdin)


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_packaged_example_config_equals_config_edged_yaml():
    """The installer starts from the packaged file (a wheel has no config/ folder); config/edged.yaml
    links to it, so there is one file to edit."""
    assert (ROOT / "config" / "edged.yaml").resolve() == install.EXAMPLE_CONFIG.resolve()


def test_launcher_found_without_path_and_not_a_decoy_on_path(tmp_path):
    """Under sudo the user's venv is not on PATH: the installer names the launcher it was started
    from, never whatever `edged` PATH finds (here a decoy first on PATH)."""
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    launcher = venv_bin / "edged"
    # What pip writes as a console script, plus the worktree on sys.path.
    launcher.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                        "from edged.cli import main\nsys.exit(main())\n")
    launcher.chmod(0o755)
    decoy_dir = tmp_path / "decoy"
    decoy_dir.mkdir()
    decoy = decoy_dir / "edged"
    decoy.write_text("#!/bin/sh\nexit 99\n")
    decoy.chmod(0o755)
    root = make_root(tmp_path)
    out = subprocess.run([str(launcher), "install-service", "--dry-run", "--root", str(root), "--source", "/dev/video0"],
                         env=dict(os.environ, PATH=f"{decoy_dir}:{SUDO_PATH}"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"launcher: {launcher}" in out.stdout
    assert f"ExecStart={launcher} run --config /etc/edged/edged.yaml" in out.stdout
    assert str(decoy) not in out.stdout


def test_find_edged_bin_beside_the_interpreter_and_errors(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "edged").write_text("#!/bin/sh\n")
    (bin_dir / "edged").chmod(0o755)
    # python -m edged: argv[0] is __main__.py; the launcher sits beside the (unresolved) interpreter.
    assert install.find_edged_bin("/x/edged/__main__.py", str(bin_dir / "python")) == bin_dir / "edged"
    (bin_dir / "edged").chmod(0o644)  # not executable
    with pytest.raises(install.InstallError, match="cannot find the edged launcher"):
        install.find_edged_bin("/x/edged/__main__.py", str(bin_dir / "python"))


def test_dry_run_prints_every_step_and_changes_nothing(tmp_path):
    root = make_root(tmp_path)
    before = tree(root)
    out = edged_cmd("--dry-run", "--root", str(root))  # stdin is not a terminal: the default camera
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"+ useradd --root {root} --system --user-group --home-dir /var/lib/edged" in text
    assert "--groups video,plugdev edged" in text
    assert f"mkdir {root}/etc/edged (mode 0750, root:edged)" in text
    assert f"write {root}/etc/edged/edged.yaml (mode 0640, root:edged)" in text
    assert "capture.source: /dev/video0" in text and "state_dir: /var/lib/edged" in text
    assert f"mkdir {root}/var/lib/edged (mode 0700, owner edged)" in text
    assert f"write {root}/etc/systemd/system/edged.service (mode 0644)" in text
    assert "ExecStart=" in text and "RestartPreventExitStatus=64 66 78" in text
    assert f"+ systemctl --root {root} enable edged.service" in text
    assert tree(root) == before, "a dry run changed files"


def test_dry_run_on_the_live_system_lists_systemctl_steps(tmp_path):
    out = edged_cmd("--dry-run", "--source", "0", "--config-dir", str(tmp_path / "conf"))
    assert out.returncode == 0, out.stderr
    assert "+ systemctl daemon-reload" in out.stdout and "+ systemctl enable --now edged.service" in out.stdout
    assert "capture.source: 0" in out.stdout
    assert not (tmp_path / "conf").exists()


def test_source_with_credentials_is_not_printed(tmp_path):
    out = edged_cmd("--dry-run", "--root", str(make_root(tmp_path)), "--source", "rtsp://viewer:S3cret@127.0.0.1:8554/cam")
    assert out.returncode == 0, out.stderr
    assert "capture.source: rtsp://viewer:***@127.0.0.1:8554/cam" in out.stdout
    assert "S3cret" not in out.stdout + out.stderr


def test_camera_is_asked_on_a_terminal(tmp_path):
    root = make_root(tmp_path)
    pid, fd = pty.fork()
    if pid == 0:  # child: the installer with a terminal on stdin/stdout
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "edged", "install-service", "--dry-run", "--root", str(root)])
    output = b""
    answered = False
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if not answered and b"[/dev/video0]: " in output:
                os.write(fd, b"/dev/video2\n")
                answered = True
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = output.decode(errors="replace")
    assert answered, text
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "capture.source: /dev/video2" in text


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _group_file(root: Path) -> dict:
    return install.read_group_file(root)


def test_install_into_a_root_tree(tmp_path):
    _need_root()
    root = make_root(tmp_path)
    # --force: the test interpreter may live under /root (pyenv); the refusal itself is tested below.
    out = edged_cmd("--root", str(root), "--source", "/dev/video0", "--force")
    assert out.returncode == 0, out.stdout + out.stderr
    groups = _group_file(root)
    edged_gid = groups["edged"][0]
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()}
    assert passwd["edged"][5] == "/var/lib/edged" and passwd["edged"][6] == "/usr/sbin/nologin"
    assert "edged" in groups["video"][1] and "edged" in groups["plugdev"][1]

    conf_dir = root / "etc" / "edged"
    conf = conf_dir / "edged.yaml"
    unit = root / "etc" / "systemd" / "system" / "edged.service"
    assert _mode(conf_dir) == 0o750 and (conf_dir.stat().st_uid, conf_dir.stat().st_gid) == (0, edged_gid)
    assert _mode(conf) == 0o640 and (conf.stat().st_uid, conf.stat().st_gid) == (0, edged_gid)
    assert _mode(unit) == 0o644
    # The state directory exists before the first start, as the unit's StateDirectory= makes it.
    state = root / "var" / "lib" / "edged"
    assert _mode(state) == 0o700
    assert (state.stat().st_uid, state.stat().st_gid) == (int(passwd["edged"][2]), int(passwd["edged"][3]))
    assert (root / "etc" / "systemd" / "system" / "multi-user.target.wants" / "edged.service").is_symlink()
    assert f"ExecStart={install.find_edged_bin()} run --config /etc/edged/edged.yaml" in unit.read_text()

    # The config watches the camera, keeps its state where the unit says, and its models resolve to
    # the installed package's (also from a wheel: nothing points into a source checkout).
    cfg = load_config(conf)
    assert cfg.capture.source == "/dev/video0" and cfg.state_dir == "/var/lib/edged"
    for model in (cfg.detector.model, cfg.encoder.model):
        path = resolve_path(model, conf)
        assert path.is_file() and path.parent == PACKAGE_DIR / "models", path

    # Again, with an existing config an older installer left world-readable and root:root, and a new
    # device group (a PCIe Edge TPU driver came along).
    with (root / "etc" / "group").open("a") as f:
        f.write("apex:x:120:\n")
    conf.chmod(0o644)
    os.chown(conf, 0, 0)
    before = conf.read_bytes()
    again = edged_cmd("--root", str(root), "--source", "/dev/video4", "--force")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"keeping the existing {conf} (not overwritten; --source ignored)" in again.stdout
    assert conf.read_bytes() == before
    assert f"set {conf} to mode 0640, root:edged (was 0644, uid 0 gid 0)" in again.stdout
    assert _mode(conf) == 0o640 and conf.stat().st_gid == edged_gid
    assert f"set {conf_dir} (mode 0750, root:edged)" in again.stdout
    assert f"+ usermod --root {root} --append --groups apex edged" in again.stdout
    assert "edged" in _group_file(root)["apex"][1]
    assert f"replace {unit}" in again.stdout
    assert f"set {state} (mode 0700, owner edged)" in again.stdout


def test_home_directory_installs_are_refused(tmp_path, monkeypatch, capsys):
    """A service cannot run edged from a home directory (ProtectHome=yes, homes are 0700): the installer
    says so and how to install system-wide; a dry run warns and still shows the plan."""
    venv = Path(install.find_edged_bin()).parent.parent
    monkeypatch.setattr(install, "PRIVATE_DIRS", (venv,))
    root = make_root(tmp_path)
    args = argparse.Namespace(source="/dev/video0", root=str(root), unit_dir="/etc/systemd/system",
                              config_dir="/etc/edged", user="edged", no_enable=False, dry_run=False, force=False)
    assert install.run(args) == 1
    err = capsys.readouterr().err
    assert "edged is installed under a home directory" in err
    assert "sudo /usr/bin/python3 -m venv /opt/edged" in err and "sudo /opt/edged/bin/edged install-service" in err
    assert not (root / "etc" / "edged").exists()
    args.dry_run = True
    assert install.run(args) == 0
    captured = capsys.readouterr()
    assert "the real install refuses this without --force" in captured.err
    assert "write " in captured.out


def test_an_existing_demo_config_is_kept_but_flagged(tmp_path):
    """Older installers left `source: demo` in /etc/edged/edged.yaml: kept, but the installer says so."""
    root = make_root(tmp_path)
    conf = root / "etc" / "edged" / "edged.yaml"
    conf.parent.mkdir(parents=True)
    conf.write_text(install.EXAMPLE_CONFIG.read_text())
    out = edged_cmd("--dry-run", "--root", str(root))
    assert out.returncode == 0, out.stderr
    assert f"keeping the existing {conf} (not overwritten)" in out.stdout
    assert f"warning: {conf} still has capture.source: demo" in out.stdout
    assert "write " + str(conf) not in out.stdout


def test_launcher_paths_the_unit_cannot_take():
    with pytest.raises(install.InstallError, match="white space"):
        install.render_unit("/opt/my edged/bin/edged")
    assert "ExecStart=/opt/100%%/bin/edged run" in install.render_unit("/opt/100%/bin/edged")


def test_unreachable_paths():
    home = (Path("/home"), Path("/root"))
    assert install.unreachable_paths([Path("/home/pi/.venv/bin/edged"), Path("/opt/edged/bin/edged")], home) == \
        [Path("/home/pi/.venv/bin/edged")]
    assert install.unreachable_paths([Path("/homework/x"), Path("/root")], home) == [Path("/root")]


def test_service_config_is_validated_and_demo_or_empty_sources_are_flagged(tmp_path):
    example = install.EXAMPLE_CONFIG.read_text()
    with pytest.raises(install.InstallError, match="no 'capture.source'"):
        install.service_config(example.replace("  source: demo", "  src: demo"), "/dev/video0")
    with pytest.raises(install.InstallError, match="(?s)would be invalid.*capture.fps_cap"):
        install.service_config(example.replace("fps_cap: 0.0", "fps_cap: -1.0"), "/dev/video0")
    root = make_root(tmp_path)
    out = edged_cmd("--dry-run", "--root", str(root), "--source", "demo")
    assert out.returncode == 0 and "warning: the demo scene ends" in out.stdout
    out = edged_cmd("--dry-run", "--root", str(root), "--source", " ")
    assert out.returncode == 1 and "--source is empty" in out.stderr
