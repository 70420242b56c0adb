"""Keep secrets out of log lines, tracebacks, stats, pages and printed configs.

Two mechanisms:
- structural redaction: `redact_url` shows a URL with the password of its userinfo and the values of
  credential-like query parameters (`token=`, `password=`, `sig=`, ...) replaced by `***`, keeping the
  user name, host, port and path so an operator still sees which camera is meant; `redact_text` does the
  same to every URL inside free text (an OpenCV/FFmpeg error message, an exception);
- a process-wide registry of secret strings (`register_secret`: passwords read from files, environment
  variables or URLs) that `redact_text`, and so the logging filter `SecretFilter`, replaces wherever they
  appear: in the formatted message, in exception text and in stack traces.

Secrets shorter than `MIN_SECRET_LENGTH` characters are registered but not replaced in free text:
replacing every "ab" would mangle normal words and, by where the `***` appear, reveal the secret anyway.
They are still redacted wherever they sit in a URL's userinfo or in a password field (structural
redaction), and `register_secret` warns once that such a password is too short to be hidden elsewhere.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from typing import Iterable, Optional, Tuple
from urllib.parse import quote

REDACTED = "***"
MIN_SECRET_LENGTH = 4

# Query parameter names whose value is a credential. A name matches when it contains one of these
# (case-insensitive): `api_key`, `X-Amz-Signature`, `auth_token`, `passphrase`... Redacting a harmless
# parameter by mistake costs only a less informative display; the URL actually opened is never altered.
_CREDENTIAL_PARAM_PARTS = ("password", "passwd", "pwd", "pass", "token", "key", "secret", "auth", "sig",
                           "credential", "session")

_URL_RE = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>[^\s'\"<>]*)")
_QUERY_PARAM_RE = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;#\s'\"]*)=(?P<value>[^&;#\s'\"]*)")

_lock = threading.Lock()
_secrets: Tuple[str, ...] = ()  # longest first, so a secret containing another is replaced whole
_warned_short = False
log = logging.getLogger(__name__)


def is_credential_param(name: str) -> bool:
    lowered = name.lower()
    return any(part in lowered for part in _CREDENTIAL_PARAM_PARTS)


def _redact_query(text: str) -> str:
    def sub(m: "re.Match[str]") -> str:
        if m.group("value") and is_credential_param(m.group("name")):
            return f"{m.group('lead')}{m.group('name')}={REDACTED}"
        return m.group(0)

    return _QUERY_PARAM_RE.sub(sub, text)


def split_userinfo(url: str, *, greedy: bool = False) -> Tuple[str, Optional[str], str]:
    """(scheme://, userinfo or None, rest) of a URL. The userinfo ends at the last '@' before the query,
    so a password with an unencoded '@' or '/' (a common mistake) is still taken whole. `greedy`: at the
    last '@' of all, so that a password with an unencoded '?' or '#' is hidden too (for display only:
    a URL with an '@' in its query is then shown with more redacted than needed)."""
    scheme, sep, remainder = url.partition("://")
    if not sep:
        return "", None, url
    head = remainder if greedy else re.split(r"[?#]", remainder, maxsplit=1)[0]
    at = head.rfind("@")
    if at < 0:
        return scheme + sep, None, remainder
    return scheme + sep, remainder[:at], remainder[at + 1:]


def redact_url(url: str) -> str:
    """The URL as it may be shown: `rtsp://user:***@cam/x?token=***` (user, host, port and path kept)."""
    return _replace_registered(_redact_url_structure(url))


def redact_text(text: str) -> str:
    """Free text (an error message, a traceback) with every URL redacted and every registered secret
    replaced."""
    if not text:
        return text
    text = _URL_RE.sub(lambda m: _redact_url_structure(m.group(0)), text)
    return _replace_registered(text)


def _redact_url_structure(url: str) -> str:
    prefix, userinfo, rest = split_userinfo(url, greedy=True)
    shown = prefix
    if userinfo is not None:
        user, colon, password = userinfo.partition(":")
        shown += f"{user}:{REDACTED}@" if colon and password else f"{userinfo}@"
    return shown + _redact_query(rest)


def _variants(secret: str) -> Iterable[str]:
    """The forms a secret takes in text: as is, and percent-encoded as it sits in a URL."""
    yield secret
    yield quote(secret, safe="")
    yield quote(secret, safe="!$&'()*+,;=")  # userinfo may keep sub-delims unencoded


def register_secret(secret: Optional[str]) -> None:
    """Remember `secret` (a password, a token) so that `redact_text` and the logging filter hide it."""
    global _secrets, _warned_short
    if not secret:
        return
    if len(secret) < MIN_SECRET_LENGTH:
        with _lock:
            warn, _warned_short = not _warned_short, True
        if warn:
            log.warning("a configured password is shorter than %d characters: it is hidden in URLs and "
                        "config output, but cannot be hidden from free-text log lines; use a longer one",
                        MIN_SECRET_LENGTH)
        return
    with _lock:
        known = set(_secrets)
        known.update(v for v in _variants(secret) if len(v) >= MIN_SECRET_LENGTH)
        _secrets = tuple(sorted(known, key=len, reverse=True))


def _replace_registered(text: str) -> str:
    for secret in _secrets:  # an immutable tuple: safe to read while another thread registers
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class SecretFilter(logging.Filter):
    """A handler filter that redacts the formatted message, the exception text and the stack info of
    every record before any formatter or handler sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let logging report it as it always does
            return True
        record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True
