"""Process exit codes of `edged run` (documented in the README; systemd/edged.service lists the ones
that must not restart the service in RestartPreventExitStatus=).

The values follow sysexits(3) so that they mean the same thing to an operator reading the journal.
"""

from __future__ import annotations

OK = 0  # stopped on request (SIGTERM/SIGINT) or the video file ended
STAGE_FAILED = 70  # EX_SOFTWARE: a stage kept failing after restarts; systemd restarts the service
CONFIG = 78  # EX_CONFIG: invalid config, or a model / TLS / password file it names cannot be used
NO_INPUT = 66  # EX_NOINPUT: the configured source can never deliver (missing video file, no demo deps)
CANT_CREATE = 73  # EX_CANTCREAT: the state directory or the outbox cannot be created or written
TEMP_FAIL = 75  # EX_TEMPFAIL: a resource is busy right now (the debug server's port is taken)
USAGE = 64  # EX_USAGE: bad command line

# Exit codes a restart cannot fix: systemd must not restart-loop on them.
NO_RESTART = (CONFIG, NO_INPUT, USAGE)

DESCRIPTIONS = {
    OK: "stopped on request, or the video file ended",
    USAGE: "bad command line",
    NO_INPUT: "the source can never deliver frames (missing video file, demo without scikit-image)",
    STAGE_FAILED: "a pipeline stage kept failing after restarts (systemd restarts the service)",
    CANT_CREATE: "the state directory or the outbox cannot be created or written",
    TEMP_FAIL: "a resource is busy (the debug server's port is taken); systemd retries",
    CONFIG: "invalid configuration, or a file it names (model, TLS, password) cannot be used",
}
