"""The outbox on the oldest SQLite it supports (3.31, Ubuntu 20.04) and on Raspberry Pi OS Bullseye's (3.34).

tests/test_outbox.py and tests/test_state_files.py run in a child pytest whose `sqlite3` module is loaded
(LD_LIBRARY_PATH) against a real old libsqlite3, and which checks `sqlite3.sqlite_version` first:
  - 3.31.1, compiled here from the amalgamation that the npm package better-sqlite3@7.0.0 bundles
    (fetched with `npm pack`, checked against a pinned sha256);
  - 3.34.1, Debian bullseye's libsqlite3-0 (the source of Raspberry Pi OS Bullseye's), fetched with
    `apt-get download` from the bullseye suite of the machine's own Debian mirror (apt checks signatures).
Both land once in a cache outside the repo ($EDGED_TEST_CACHE, default ~/.cache/edged-tests). Without
npm/cc/apt or the network the test skips, and fails when CI is set.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable, Dict

import pytest

from tests.conftest import missing

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EDGED_TEST_CACHE") or Path.home() / ".cache" / "edged-tests")

BETTER_SQLITE3 = "better-sqlite3@7.0.0"  # its deps/sqlite3.tar.gz is the SQLite 3.31.1 amalgamation
BETTER_SQLITE3_SHA256 = "47e9b65aa697626114d7e2f0d8a1e9423a41fcf16ee07dbf742195109dd5cf87"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


class Unavailable(Exception):
    """A tool or the registry is missing here: skip locally, fail under CI."""


def _run(cmd, cwd: Path, timeout: float) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"{cmd[0]}: {exc}") from None
    if proc.returncode != 0:
        raise Unavailable(f"{' '.join(map(str, cmd))} failed: {(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc.stdout


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise Unavailable(f"needs {', '.join(missing)}")


def _build_3_31_1(work: Path) -> Path:
    """libsqlite3.so.0 3.31.1 from the amalgamation in better-sqlite3@7.0.0's npm tarball."""
    _need("npm", "cc")
    _run(["npm", "pack", "--silent", BETTER_SQLITE3], cwd=work, timeout=300)
    tgz = work / "better-sqlite3-7.0.0.tgz"
    digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
    assert digest == BETTER_SQLITE3_SHA256, f"{tgz}: sha256 {digest}, expected {BETTER_SQLITE3_SHA256}"
    with tarfile.open(tgz) as outer:
        inner = outer.extractfile("package/deps/sqlite3.tar.gz").read()
    with tarfile.open(fileobj=io.BytesIO(inner)) as amalgamation:
        for name in ("sqlite3.c", "sqlite3.h"):
            (work / name).write_bytes(amalgamation.extractfile(name).read())
    # The options Debian builds with that Python's _sqlite3 needs (serialize is opt-in before 3.36).
    _run(["cc", "-O1", "-shared", "-fPIC", "-DSQLITE_THREADSAFE=1", "-DSQLITE_ENABLE_DESERIALIZE",
          "-DSQLITE_ENABLE_JSON1", "-o", "libsqlite3.so.0", "sqlite3.c", "-lpthread", "-ldl", "-lm"],
         cwd=work, timeout=600)
    return work / "libsqlite3.so.0"


def _debian_mirror() -> str:
    """The URI apt uses for this machine's Debian release (from `apt-cache policy`)."""
    codename = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            codename = line.split("=", 1)[1].strip().strip('"')
    for m in re.finditer(r"^\s+\d+ (\S+) (\S+)/main \S+ Packages$", _run(["apt-cache", "policy"], Path("/"), 60), re.M):
        if m.group(2) == codename:
            return m.group(1)
    raise Unavailable(f"no apt source for Debian {codename or '?'} main (run apt-get update)")


def _fetch_bullseye(work: Path) -> Path:
    """Debian bullseye's libsqlite3-0 (3.34.1), extracted."""
    _need("apt-get", "apt-cache", "dpkg-deb")
    if not DEBIAN_KEYRING.exists():
        raise Unavailable(f"needs {DEBIAN_KEYRING}")
    (work / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (work / "cache").mkdir(exist_ok=True)
    sources = work / "sources.list"
    sources.write_text(f"deb [signed-by={DEBIAN_KEYRING}] {_debian_mirror()} bullseye main\n")
    # A private apt state: the machine's own sources and lists stay untouched.
    apt_opts = [f"-oDir::Etc::SourceList={sources}", "-oDir::Etc::SourceParts=/dev/null",
                f"-oDir::State::Lists={work / 'lists'}", f"-oDir::Cache={work / 'cache'}",
                "-oDebug::NoLocking=1", "-oAPT::Sandbox::User=root"]
    _run(["apt-get", *apt_opts, "update"], cwd=work, timeout=600)
    _run(["apt-get", *apt_opts, "download", "libsqlite3-0/bullseye"], cwd=work, timeout=300)
    debs = sorted(work.glob("libsqlite3-0_*.deb"))
    if not debs:
        raise Unavailable("apt-get download libsqlite3-0/bullseye left no .deb")
    _run(["dpkg-deb", "-x", str(debs[-1]), str(work / "root")], cwd=work, timeout=120)
    libs = sorted((work / "root").glob("usr/lib/*/libsqlite3.so.0"))
    if not libs:
        raise Unavailable(f"{debs[-1].name} holds no libsqlite3.so.0")
    return libs[0]


# name -> (expected sqlite_version, how to get the library, needs lazy symbol binding)
LIBRARIES: Dict[str, tuple] = {
    "3.31.1": ("3.31.1", _build_3_31_1, False),
    # Debian builds 3.34 without sqlite3_serialize, which Python's _sqlite3 references but the outbox
    # never calls: the child binds symbols lazily (RTLD_LAZY) so the module loads.
    "bullseye-3.34.1": ("3.34.1", _fetch_bullseye, True),
}


def _library(name: str, get: Callable[[Path], Path]) -> Path:
    """The cached library, built or fetched once (a lock file keeps parallel runs from racing)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    done = CACHE / f"sqlite-{name}.path"
    with open(CACHE / f"sqlite-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists() and Path(done.read_text()).exists():
            return Path(done.read_text())
        work = CACHE / f"sqlite-{name}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        lib = get(work)
        done.write_text(str(lib))
        return lib


_CHILD = """
import sqlite3, sys
print("sqlite_version=" + sqlite3.sqlite_version, flush=True)
assert sqlite3.sqlite_version == {expected!r}, sqlite3.sqlite_version
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_outbox.py", "tests/test_state_files.py"]))
"""


@pytest.mark.parametrize("name", list(LIBRARIES))
def test_outbox_suite_on_old_sqlite(name, tmp_path):
    expected, get, lazy = LIBRARIES[name]
    try:
        lib = _library(name, get)
    except Unavailable as exc:
        missing(f"SQLite {name} not obtainable here: {exc}")
    env = dict(os.environ, LD_LIBRARY_PATH=str(lib.parent))
    if lazy:
        # sitecustomize runs at every interpreter start, so the tests' own child processes bind lazily too.
        (tmp_path / "sitecustomize.py").write_text("import os, sys\nsys.setdlopenflags(os.RTLD_LAZY)\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(expected=expected)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert out.startswith(f"sqlite_version={expected}\n"), out + proc.stderr
    summary = out.strip().splitlines()[-1]
    assert proc.returncode == 0 and re.search(r"\d+ passed", summary) and "failed" not in summary, out[-5000:]
