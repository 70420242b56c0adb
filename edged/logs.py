"""Logging: readable lines on a terminal, journald priorities/fields under systemd."""

from __future__ import annotations

import logging
import os
import sys
import threading
from types import TracebackType
from typing import Optional, Type

from edged.secrets import SecretFilter

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# sd-daemon(3) priority prefixes: journald reads "<N>" at the start of a stderr line as the priority.
_SD_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def under_journald() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM=dev:inode)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


class _SdPrefixFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _SD_PRIORITY.get(record.levelno, 6)
        return f"<{prio}>" + super().format(record)


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    journal = fmt == "journal" or (fmt == "auto" and under_journald())
    handler: logging.Handler
    if journal:
        try:  # structured fields (LOGGER, CODE_FILE, ...) when systemd-python is installed
            from systemd.journal import JournalHandler  # type: ignore

            handler = JournalHandler(SYSLOG_IDENTIFIER="edged")
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(_SdPrefixFormatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    # On the handler, not a logger: records of every library (paho, PIL, ...) pass through it.
    handler.addFilter(SecretFilter())
    root.addHandler(handler)
    logging.getLogger("PIL").setLevel(logging.WARNING)
    # Uncaught exceptions are printed by Python itself, bypassing logging and so the redaction: route
    # them through the same handler.
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def set_level(level: str) -> None:
    """logging.level changed live: the root logger's level (every handler stays). Raises ValueError
    naming the key for a level other than debug, info, warning, error."""
    if level not in _LEVELS:
        raise ValueError(f"logging.level must be one of {', '.join(_LEVELS)}, got {level!r}")
    logging.getLogger().setLevel(_LEVELS[level])


def _log_uncaught(kind: Type[BaseException], value: BaseException, tb: Optional[TracebackType]) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("edged").critical("uncaught exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: "threading.ExceptHookArgs") -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("edged").critical("uncaught exception in thread %s", name,
                                        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
