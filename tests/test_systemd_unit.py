"""The systemd unit: systemd's own checks on the rendered unit, and the daemon really running under the
unit's sandbox (its seccomp filters replicated by tests/_unit_sandbox.py; systemd is never PID 1 here)."""

from __future__ import annotations

import configparser
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
import yaml

from edged import exitcodes, install
from tests.conftest import ROOT, free_port, missing, need_program
from tests.mqttutil import Collector

UNIT = ROOT / "systemd" / "edged.service"
SANDBOX = ROOT / "tests" / "_unit_sandbox.py"
MAX_EXPOSURE = 2.5
VIDEO_GID = 44  # Debian's fixed gid of the video group


def _systemd_analyze() -> str:
    return need_program("systemd-analyze")


@pytest.fixture()
def rendered_unit(tmp_path) -> Path:
    """The unit as the installer writes it, ExecStart pointing at a real executable (verify checks it)."""
    try:
        edged_bin = install.find_edged_bin()
    except install.InstallError:  # pytest run by an interpreter without a launcher beside it
        edged_bin = Path(sys.executable)
    path = tmp_path / "edged.service"
    path.write_text(install.render_unit(str(edged_bin)))
    return path


def _service_section(unit: Path) -> configparser.SectionProxy:
    cp = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    cp.optionxform = str  # keep the keys' case
    cp.read_string(unit.read_text())
    return cp["Service"]


def test_package_copy_of_the_unit_equals_systemd_edged_service():
    """The installer renders the copy shipped in the package; the repo's systemd/edged.service is the one
    users read. They are one file: systemd/edged.service links to the packaged one."""
    assert UNIT.resolve() == install.UNIT_TEMPLATE.resolve()


def test_security_exposure_is_ok(rendered_unit):
    out = subprocess.run([_systemd_analyze(), "security", "--offline=true", "--no-pager", str(rendered_unit)],
                         capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    m = re.search(r"Overall exposure level for edged\.service: (\d+\.\d+) (\w+)", text)
    assert m, f"no exposure level in systemd-analyze output:\n{text}"
    assert float(m.group(1)) <= MAX_EXPOSURE, f"exposure {m.group(1)} {m.group(2)}:\n{text}"
    assert m.group(2) in ("OK", "SAFE")
    # The openings we keep are the ones the daemon needs (network, devices, /proc/cpuinfo); nothing else
    # is flagged.
    flagged = {line.split()[1].split("=")[0] for line in text.splitlines() if line.startswith("✗")}
    assert flagged <= {"RootDirectory", "SupplementaryGroups", "PrivateDevices", "RestrictAddressFamilies",
                       "ProcSubset", "PrivateNetwork", "DeviceAllow", "IPAddressDeny"}, flagged


def test_verify_is_clean(rendered_unit):
    out = subprocess.run([_systemd_analyze(), "verify", str(rendered_unit)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr


def test_verify_catches_a_broken_unit(tmp_path):
    """The verify check above can fail: a missing ExecStart binary and a typo are reported."""
    bad = tmp_path / "edged.service"
    bad.write_text(install.render_unit("/nonexistent/edged").replace("ProtectHome=yes", "ProtectHome=yess"))
    out = subprocess.run([_systemd_analyze(), "verify", str(bad)], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert "/nonexistent/edged is not executable" in text and "protect home value" in text


def test_restart_policy_and_modes_match_the_exit_codes():
    svc = _service_section(UNIT)
    assert svc["Restart"] == "on-failure"
    assert {int(c) for c in svc["RestartPreventExitStatus"].split()} == set(exitcodes.NO_RESTART)
    assert exitcodes.STAGE_FAILED not in exitcodes.NO_RESTART  # a failing stage is restarted by systemd
    assert svc["StateDirectoryMode"] == "0700" and svc["UMask"] == "0077"
    assert svc["ConfigurationDirectoryMode"] == oct(install.CONFIG_DIR_MODE)[2:].zfill(4)
    assert svc["ExecStart"].startswith("@EDGED_BIN@ run --config /etc/edged/edged.yaml")


# ------------------------------------------------------------------------------ the sandbox, for real
def _sandboxed(unit: Path, *cmd: str) -> list:
    return [sys.executable, str(SANDBOX), str(unit), "--", *cmd]


def test_sandbox_replica_enforces_the_unit(rendered_unit):
    """The replica is not a no-op: what the unit forbids fails inside it, what it allows works."""
    probe = r"""
import ctypes, json, mmap, os, socket
def attempt(fn):
    try:
        fn(); return "ok"
    except OSError as e:
        return e.errno
print(json.dumps({
  "wx_mmap": attempt(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)),
  "packet_socket": attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()),
  "inet_socket": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
  "inet6_socket": attempt(lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()),
  "unix_socket": attempt(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close()),
  "netlink_socket": attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 15).close()),
  "setuid": attempt(lambda: os.setuid(os.getuid())),
  "setpriority": attempt(lambda: os.setpriority(os.PRIO_PROCESS, 0, 5)),
  "ctypes_callback": attempt(lambda: ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 1)()),
  "umask": oct(os.umask(0)),
}))
"""
    out = subprocess.run(_sandboxed(rendered_unit, sys.executable, "-c", probe), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["wx_mmap"] == errno.EPERM  # MemoryDenyWriteExecute=yes
    assert got["packet_socket"] == errno.EAFNOSUPPORT  # RestrictAddressFamilies=
    assert got["setuid"] == errno.EPERM and got["setpriority"] == errno.EPERM  # ~@privileged @resources
    assert got["umask"] == "0o77"
    for allowed in ("inet_socket", "inet6_socket", "unix_socket", "netlink_socket", "ctypes_callback"):
        assert got[allowed] == "ok", (allowed, got[allowed])


@pytest.mark.slow
def test_daemon_works_under_the_units_sandbox(tmp_path, rendered_unit, broker):
    """The whole daemon (int8 detector + encoder on the demo scene, MQTT to a real broker, the debug HTTP
    server, sd_notify) under the unit's seccomp filters: W^X memory, the syscall allow-list, the address
    families. Events reach the broker, /healthz answers, READY/STOPPING reach the notify socket, exit 0."""
    web_port = free_port()
    cfg = tmp_path / "edged.yaml"
    cfg.write_text(yaml.safe_dump({
        "device_id": "sandboxed",
        "state_dir": str(tmp_path / "state"),
        "capture": {"source": "demo"},
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "web": {"enabled": True, "host": "127.0.0.1", "port": web_port},
    }))
    sock_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.settimeout(120)
    sub = Collector(broker.port, "edged/sandboxed/#")
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path))
    proc = subprocess.Popen(_sandboxed(rendered_unit, sys.executable, "-m", "edged", "run", "--config", str(cfg)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        got = []
        while not any(m.startswith("READY=1") for m in got):
            got.append(notify.recv(4096).decode())
        assert sub.wait_for(lambda ms: any(m.topic.endswith("/events") and m.json()["type"] == "enter" for m in ms), 120), \
            "no enter event reached the broker"
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=30) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in got:
            got.append(notify.recv(4096).decode())
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "sandbox: umask 0077; MemoryDenyWriteExecute" in err and "SystemCallFilter" in err
        state = tmp_path / "state"
        assert all(p.stat().st_mode & 0o077 == 0 for p in state.iterdir()), "UMask=0077: state files private"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        sub.close()
        notify.close()


def test_private_users_keeps_device_access_through_supplementary_groups(tmp_path):
    """PrivateUsers=yes maps only root, the service user and nobody; the camera's group (video) is then
    unmapped inside the namespace. The kernel still grants group access by the real group id, as
    systemd's order (groups set, then the user namespace) gives: checked with setpriv + unshare."""
    if os.geteuid() != 0:
        missing("needs root to switch users (CI runs as root)")
    for tool in ("setpriv", "unshare"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} (util-linux) is missing")
    with tempfile.TemporaryDirectory(prefix="edged-unit-") as d:
        os.chmod(d, 0o755)  # the unprivileged user must reach the file (pytest's tmp root is 0700)
        device = Path(d) / "video-device"
        device.write_text("frame")
        os.chown(device, 0, VIDEO_GID)  # root:video 0660 stands in for /dev/videoN
        device.chmod(0o660)
        nobody = 65534
        base = ["setpriv", f"--reuid={nobody}", f"--regid={nobody}"]
        in_ns = ["unshare", "--user", f"--map-user={nobody}", f"--map-group={nobody}", "cat", str(device)]
        with_group = subprocess.run([*base, f"--groups={VIDEO_GID}", *in_ns], capture_output=True, text=True, timeout=60)
        without = subprocess.run([*base, "--clear-groups", *in_ns], capture_output=True, text=True, timeout=60)
    assert with_group.returncode == 0 and with_group.stdout == "frame", with_group.stderr
    assert without.returncode != 0 and "Permission denied" in without.stderr

