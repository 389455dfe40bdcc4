"""Exchange API credentials: loaded from the environment or a private ``.env`` file, never shown.

Sources, in order:

1. the environment variables ``ATS_BINANCE_API_KEY`` and ``ATS_BINANCE_API_SECRET`` (both set);
2. an ``.env`` file (parsed with python-dotenv, never exported to ``os.environ``) holding the same
   two names. The file must not be accessible by group or others (``mode & 0o077 == 0``, i.e.
   ``chmod 600``): otherwise :class:`serving.errors.FatalError` is raised before it is read.

The values live in :class:`Secret` objects whose ``repr``/``str``/format are ``'***'`` and that
refuse to be pickled, so a key cannot end up in a log line, an exception message, a config dump
or the state database by accident. :func:`redact` / :meth:`ApiCredentials.redact` scrub both values
from any text (used on every error message the live loop records), and
:func:`install_log_redaction` scrubs them from the log records of the HTTP/ccxt loggers (ccxt
logs every request's headers, including ``X-MBX-APIKEY``, at DEBUG level).
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values

from serving.errors import FatalError

# the query string of a request URL quoted in an error: ccxt error texts quote the signed URL
_URL_QUERY = re.compile(r"(https?://[^\s?\"'<>]+)\?[^\s\"'<>]*")

ENV_API_KEY = "ATS_BINANCE_API_KEY"
ENV_API_SECRET = "ATS_BINANCE_API_SECRET"
REDACTED = "***"


class Secret:
    """A string that never shows itself: ``repr``/``str`` give ``'***'``; :meth:`reveal` returns it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value.strip():
            raise FatalError("a credential is empty or not a string")
        self._value = value.strip()

    def reveal(self) -> str:
        """The secret value (pass it straight to the exchange client; never log it)."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"

    def __str__(self) -> str:
        return REDACTED

    def __format__(self, spec: str) -> str:
        return REDACTED

    def __reduce__(self):
        raise TypeError("Secret values cannot be pickled")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", len(self._value)))


@dataclass(frozen=True, repr=False)
class ApiCredentials:
    """API key and secret; ``source`` says where they came from ('env' or the file path)."""

    api_key: Secret
    api_secret: Secret
    source: str

    def __repr__(self) -> str:
        return f"ApiCredentials(api_key={REDACTED!r}, api_secret={REDACTED!r}, source={self.source!r})"

    __str__ = __repr__

    def redact(self, text: str) -> str:
        """``text`` with both values replaced by ``'***'``."""
        return redact(text, (self.api_key.reveal(), self.api_secret.reveal()))


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of each secret (of 4+ characters) in ``text`` by ``'***'``."""
    out = str(text)
    for s in sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True):
        out = out.replace(s, REDACTED)
    return out


def strip_url_queries(text: str) -> str:
    """``text`` with the query string of every http(s) URL replaced by ``?<query removed>`` (pure).

    ccxt quotes the request URL in its error messages; for a signed Binance request the query
    carries ``timestamp`` and ``signature`` (not the key, but request material that must not be
    kept in logs or the state database).
    """
    return _URL_QUERY.sub(r"\1?<query removed>", str(text))


def check_private_file(path: str | Path) -> Path:
    """Return ``path`` if it is a regular file with no group/other permission bits.

    Raises
    ------
    FatalError
        Missing, not a regular file, or accessible by group/others (the mode is named, the content
        is never read).
    """
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError as exc:
        raise FatalError(f"credentials file {p} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FatalError(f"credentials file {p} is not a regular file")
    if st.st_mode & 0o077:
        raise FatalError(
            f"credentials file {p} has mode {stat.S_IMODE(st.st_mode):04o}: group/others may access it; "
            f"run `chmod 600 {p}`"
        )
    return p


def load_credentials(env: Mapping[str, str] | None = None, env_file: str | Path | None = None) -> ApiCredentials:
    """API credentials from the environment, else from ``env_file`` (module docstring).

    Raises
    ------
    FatalError
        Neither source has both values, one is empty, or the file is not private.
    """
    env = os.environ if env is None else env
    key, secret = env.get(ENV_API_KEY), env.get(ENV_API_SECRET)
    if key and secret:
        return ApiCredentials(Secret(key), Secret(secret), "env")
    if env_file is not None:
        path = check_private_file(env_file)
        values = dotenv_values(path)
        key, secret = values.get(ENV_API_KEY), values.get(ENV_API_SECRET)
        if key and secret:
            return ApiCredentials(Secret(key), Secret(secret), str(path))
        raise FatalError(f"{path} does not define both {ENV_API_KEY} and {ENV_API_SECRET}")
    raise FatalError(f"no API credentials: set {ENV_API_KEY} and {ENV_API_SECRET} or give an .env file")


#: loggers that print request details (ccxt logs request headers, incl. X-MBX-APIKEY, at DEBUG)
SENSITIVE_LOGGERS: tuple[str, ...] = ("ccxt.base.exchange", "ccxt", "urllib3.connectionpool")


class RedactingFilter(logging.Filter):
    """Logging filter that formats a record's message and replaces the given secrets by ``'***'``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = tuple(sorted({s for s in secrets if s and len(s) >= 4}))

    def filter(self, record: logging.LogRecord) -> bool:
        """Format the record's message with the secrets masked; always keep the record."""
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is dropped rather than risk a leak
            return False
        clean = redact(message, self.secrets)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RedactingFilter) and other.secrets == self.secrets

    def __hash__(self) -> int:
        return hash(self.secrets)


def install_log_redaction(secrets: Iterable[str], loggers: Iterable[str] = SENSITIVE_LOGGERS) -> RedactingFilter:
    """Attach one :class:`RedactingFilter` for ``secrets`` to each of ``loggers`` (idempotent)."""
    filt = RedactingFilter(secrets)
    for name in loggers:
        logger = logging.getLogger(name)
        if filt not in logger.filters:
            logger.addFilter(filt)
    return filt
