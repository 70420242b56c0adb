#!/usr/bin/env python3
"""Host-side helpers of scripts/check-arm64.sh (stdlib only; runs on the host's python3).

  apt-sources SUITE          the host's Debian archive lines for SUITE (+ -updates, -security), one
                             "deb URI SUITE COMPONENTS" per line, read from the machine's apt sources
  pip-config ROOT            copy the machine's pip configuration (config files, PIP_* variables as a
                             config file, the CA bundle / constraint files they name) into ROOT,
                             dropping settings that point at host-only directories
  doc-block FILE NAME        the shell block between <!-- check-arm64:NAME:begin/end --> in FILE
  pypi-index                 the index URL pip uses on this machine (for reachability probes)
"""

from __future__ import annotations

import configparser
import glob
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# ---------------------------------------------------------------------------------------------- apt


def _one_line_entries(path: str) -> List[Tuple[str, str, List[str]]]:
    out = []
    for raw in Path(path).read_text(errors="replace").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line)  # [arch=... signed-by=...] options
        parts = line.split()
        if len(parts) >= 4:
            out.append((parts[1], parts[2], parts[3:]))
    return out


def _deb822_entries(path: str) -> List[Tuple[str, str, List[str]]]:
    out = []
    for para in re.split(r"\n\s*\n", Path(path).read_text(errors="replace")):
        fields: Dict[str, str] = {}
        key = None
        for line in para.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
            continue
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                out.append((uri, suite, fields.get("components", "main").split()))
    return out


def apt_sources(suite: str) -> List[str]:
    entries = []
    files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
    for f in files:
        if os.path.isfile(f):
            entries += _one_line_entries(f)
    for f in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        entries += _deb822_entries(f)
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    lines = [f"deb {uri} {s} main" for uri, s, comps in entries if s in wanted and "main" in comps]
    if not any(f" {suite} " in line for line in lines):
        # The host runs another release: take its Debian archive and ask it for SUITE.
        debian = [uri for uri, s, comps in entries if uri.rstrip("/").endswith("/debian") and "main" in comps]
        if debian:
            lines.insert(0, f"deb {debian[0]} {suite} main")
    return list(dict.fromkeys(lines))


# ---------------------------------------------------------------------------------------------- pip

_PATH_KEYS = {"cert", "client-cert", "constraint", "requirement", "find-links", "index-url", "extra-index-url"}


def _host_only(value: str) -> Optional[str]:
    """None when `value` works inside the root as is (URL, or a file we copy); else why it is dropped."""
    path = value[len("file://") :] if value.startswith("file://") else value
    if not path.startswith("/"):
        return None  # an http(s) index or a bare option value
    if os.path.isfile(path):
        return None
    return f"{value}: a host directory (not copied into the emulated system)"


def _files_to_copy(value: str) -> List[str]:
    path = value[len("file://") :] if value.startswith("file://") else value
    return [path] if path.startswith("/") and os.path.isfile(path) else []


def _translate(cfg: configparser.ConfigParser, root: Path, dropped: List[str]) -> configparser.ConfigParser:
    out = configparser.ConfigParser(interpolation=None)
    for section in cfg.sections():
        for key, value in cfg.items(section, raw=True):
            kept = []
            for item in value.split():
                why = _host_only(item) if key in _PATH_KEYS else None
                if why:
                    dropped.append(f"[{section}] {key} = {why}")
                    continue
                kept.append(item)
                for f in _files_to_copy(item):
                    dest = root / f.lstrip("/")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, dest)
            if kept:
                if not out.has_section(section):
                    out.add_section(section)
                out.set(section, key, " ".join(kept))
    return out


def _write(cfg: configparser.ConfigParser, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("w") as fh:
        fh.write("# Copied from the host by scripts/check-arm64.sh (host-only settings dropped).\n")
        cfg.write(fh)


def pip_config(root: Path) -> List[str]:
    """Copy the host's pip setup into `root`; returns one line per copied or dropped setting."""
    report: List[str] = []
    dropped: List[str] = []
    home = Path(os.environ.get("HOME", "/root"))
    # Inside the root pip runs as root via sudo (HOME=/root), like `sudo pip install` on a Pi.
    pairs = [
        (Path("/etc/xdg/pip/pip.conf"), root / "etc/xdg/pip/pip.conf"),
        (Path("/etc/pip.conf"), root / "etc/pip.conf"),
        (home / ".config/pip/pip.conf", root / "root/.config/pip/pip.conf"),
        (home / ".pip/pip.conf", root / "root/.pip/pip.conf"),
    ]
    for src, dest in pairs:
        if src.is_file():
            cfg = configparser.ConfigParser(interpolation=None)
            cfg.read(src)
            _write(_translate(cfg, root, dropped), dest)
            report.append(f"copied {src} -> {dest.relative_to(root)}")
    # PIP_* variables do not pass sudo's env_reset: they become a config file that sudo'd pip reads.
    env = configparser.ConfigParser(interpolation=None)
    env.add_section("global")
    for name, value in sorted(os.environ.items()):
        if name.startswith("PIP_") and name != "PIP_CONFIG_FILE" and value:
            env.set("global", name[4:].lower().replace("_", "-"), value)
    if env.items("global"):
        names = [k for k, _ in env.items("global")]
        # Config files are read in order and the later one wins, like the variables win on the host:
        # the variables go into the site-wide file read last (/etc/pip.conf) after its own settings.
        base = configparser.ConfigParser(interpolation=None)
        target = root / "etc/pip.conf"
        if target.is_file():
            base.read(target)
        merged = _translate(env, root, dropped)
        for section in merged.sections():
            if not base.has_section(section):
                base.add_section(section)
            for k, v in merged.items(section, raw=True):
                base.set(section, k, v)
        _write(base, target)
        report.append(f"PIP_* variables ({', '.join(names)}) -> etc/pip.conf")
    for d in dropped:
        report.append(f"dropped {d}")
    return report


def pypi_index() -> str:
    for name in ("PIP_INDEX_URL",):
        if os.environ.get(name):
            return os.environ[name]
    home = Path(os.environ.get("HOME", "/root"))
    url = "https://pypi.org/simple"
    for f in (Path("/etc/xdg/pip/pip.conf"), Path("/etc/pip.conf"), home / ".config/pip/pip.conf"):
        if f.is_file():
            cfg = configparser.ConfigParser(interpolation=None)
            cfg.read(f)
            if cfg.has_option("global", "index-url"):
                url = cfg.get("global", "index-url").split()[0]
    return url


# ---------------------------------------------------------------------------------------------- docs


def doc_block(path: str, name: str) -> str:
    text = Path(path).read_text()
    m = re.search(
        rf"<!-- check-arm64:{re.escape(name)}:begin -->\s*```[a-z]*\n(.*?)```\s*<!-- check-arm64:{re.escape(name)}:end -->",
        text,
        re.S,
    )
    if not m:
        raise SystemExit(f"{path}: no shell block marked <!-- check-arm64:{name}:begin/end -->")
    return m.group(1)


def main(argv: List[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "apt-sources" and len(args) == 1:
        lines = apt_sources(args[0])
        if not lines:
            print(f"no Debian archive for {args[0]} in /etc/apt/sources.list{{,.d/*}}", file=sys.stderr)
            return 1
        print("\n".join(lines))
        return 0
    if cmd == "pip-config" and len(args) == 1:
        print("\n".join(pip_config(Path(args[0]))))
        return 0
    if cmd == "doc-block" and len(args) == 2:
        sys.stdout.write(doc_block(args[0], args[1]))
        return 0
    if cmd == "pypi-index" and not args:
        print(pypi_index())
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
