"""Run a command under the kernel-side restrictions of a systemd unit, without systemd as PID 1.

    python tests/_unit_sandbox.py UNIT_FILE -- COMMAND [ARGS...]

Reads the unit's `SystemCallFilter=`, `SystemCallErrorNumber=`, `MemoryDenyWriteExecute=`,
`RestrictAddressFamilies=` and `UMask=` and installs the same seccomp filters systemd 252 installs for
them (built with libseccomp, as systemd does; syscall groups expanded with `systemd-analyze
syscall-filter`), then execs the command. This lets the test suite prove that the daemon really runs
under the unit's sandbox on a machine where systemd is not PID 1.

Like systemd, each directive is a separate filter: the kernel applies the most restrictive verdict.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
AF_MAX = 46  # Linux 6.x


def scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def unit_service_settings(unit: Path) -> Dict[str, List[str]]:
    """Every `Key=value` of the [Service] section, values in order (repeated keys accumulate)."""
    out: Dict[str, List[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def expand_group(name: str, seen: Set[str] | None = None) -> Set[str]:
    """Syscall names of a `@group` (nested groups expanded) as this machine's systemd defines it."""
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    text = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True).stdout
    names: Set[str] = set()
    for line in text.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        names |= expand_group(item, seen) if item.startswith("@") else {item}
    return names


def allowed_syscalls(filters: List[str]) -> Set[str]:
    """systemd's semantics: the first assignment is an allow list; a later `~` assignment removes."""
    allowed: Set[str] = set()
    for value in filters:
        deny = value.startswith("~")
        items = value.lstrip("~").split()
        names: Set[str] = set()
        for item in items:
            names |= expand_group(item) if item.startswith("@") else {item}
        if deny:
            allowed -= names
        else:
            allowed |= names
    return allowed


class Filter:
    def __init__(self, lib: ctypes.CDLL, default_action: int):
        self.lib = lib
        self.ctx = lib.seccomp_init(default_action)
        if not self.ctx:
            raise OSError("seccomp_init failed")

    def rule(self, action: int, syscall: str, *cmps: ArgCmp) -> bool:
        nr = self.lib.seccomp_syscall_resolve_name(syscall.encode())
        if nr < 0:  # not a syscall on this architecture (e.g. setuid32 on x86-64)
            return False
        arr = (ArgCmp * len(cmps))(*cmps) if cmps else None
        rc = self.lib.seccomp_rule_add_array(self.ctx, action, nr, len(cmps), arr)
        if rc < 0:
            raise OSError(-rc, f"seccomp_rule_add {syscall}: {os.strerror(-rc)}")
        return True

    def load(self) -> None:
        rc = self.lib.seccomp_load(self.ctx)
        self.lib.seccomp_release(self.ctx)
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")


def errno_number(name: str) -> int:
    return int(name) if name.isdigit() else int(getattr(errno, name))


def apply(unit: Path) -> List[str]:
    """Install the unit's filters on this process (inherited across exec). Returns what was applied."""
    s = unit_service_settings(unit)
    lib = _lib()
    applied = []
    if "UMask" in s:
        os.umask(int(s["UMask"][-1], 8))
        applied.append(f"umask {s['UMask'][-1]}")
    if s.get("MemoryDenyWriteExecute", ["no"])[-1] in ("yes", "true", "1"):
        # systemd 252 (seccomp-util.c): no mmap that is both writable and executable, no mprotect /
        # pkey_mprotect adding PROT_EXEC, no shmat with SHM_EXEC.
        f = Filter(lib, SCMP_ACT_ALLOW)
        deny = scmp_act_errno(errno.EPERM)
        f.rule(deny, "mmap", ArgCmp(2, SCMP_CMP_MASKED_EQ, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC))
        f.rule(deny, "mprotect", ArgCmp(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        f.rule(deny, "pkey_mprotect", ArgCmp(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        f.rule(deny, "shmat", ArgCmp(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        f.load()
        applied.append("MemoryDenyWriteExecute")
    if "RestrictAddressFamilies" in s:
        families = {int(getattr(socket, name)) for value in s["RestrictAddressFamilies"] for name in value.split()}
        f = Filter(lib, SCMP_ACT_ALLOW)
        for af in range(AF_MAX):
            if af not in families:
                f.rule(scmp_act_errno(errno.EAFNOSUPPORT), "socket", ArgCmp(0, SCMP_CMP_EQ, af, 0))
        f.load()
        applied.append("RestrictAddressFamilies " + " ".join(sorted(str(a) for a in families)))
    if "SystemCallFilter" in s:
        allowed = allowed_syscalls(s["SystemCallFilter"])
        default = scmp_act_errno(errno_number(s["SystemCallErrorNumber"][-1])) if "SystemCallErrorNumber" in s else 0x80000000
        f = Filter(lib, default)
        n = sum(f.rule(SCMP_ACT_ALLOW, name) for name in sorted(allowed))
        f.load()
        applied.append(f"SystemCallFilter {n} syscalls allowed")
    return applied


def main(argv: List[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 64
    applied = apply(Path(argv[0]))
    print("sandbox: " + "; ".join(applied), file=sys.stderr, flush=True)
    os.execvp(argv[2], argv[2:])
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
