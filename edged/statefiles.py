"""Private state on disk: the state directory is 0700 and every file edged writes there is 0600.

The outbox holds event payloads and the reservations reveal activity counts, so nothing in the state
directory is for other local users. Modes are set explicitly (chmod after creation), so they do not
depend on the umask the daemon was started with.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Union

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def ensure_private_dir(path: Union[str, Path]) -> Path:
    """Create `path` (and missing parents) and make `path` itself 0700; returns it.

    Existing parents are left alone (they are system directories such as /var/lib). Raises OSError
    with a message naming the path when it is not a directory or cannot be made private."""
    p = Path(path)
    try:
        p.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(f"state directory {p} exists but is not a directory") from None
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot create state directory {p}: {exc.strerror}") from None
    if not p.is_dir():
        raise NotADirectoryError(f"state directory {p} exists but is not a directory")
    if stat.S_IMODE(p.stat().st_mode) != PRIVATE_DIR_MODE:
        try:
            os.chmod(p, PRIVATE_DIR_MODE)
        except OSError as exc:
            raise type(exc)(exc.errno, f"cannot make state directory {p} private (0700): {exc.strerror}") from None
    return p


def make_private(path: Union[str, Path]) -> None:
    """chmod an existing file to 0600 unless it already is (a no-op when the file is absent)."""
    try:
        if stat.S_IMODE(os.stat(path).st_mode) != PRIVATE_FILE_MODE:
            os.chmod(path, PRIVATE_FILE_MODE)
    except FileNotFoundError:
        pass


def open_private(path: Union[str, Path], flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> int:
    """os.open() a file that is 0600 whatever the umask; returns the descriptor."""
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # an existing file keeps its old mode on open: tighten it
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private_atomic(path: Union[str, Path], data: bytes) -> None:
    """Replace `path` with `data` atomically and durably, 0600: a crash leaves the old or the new content,
    never half (temporary file, fsync, rename, fsync of the directory)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = open_private(tmp)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    # The rename is durable only once the directory is: without this a power cut could bring back the
    # previous content.
    dir_fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
