"""Serving error taxonomy, grouped by what the caller must do.

========================  ==================================================================
class                     the caller must ...
========================  ==================================================================
RetryableError            retry later (timeouts, rate limits, transient network errors)
MalformedResponseError    a RetryableError: the exchange answered (HTTP 200) with a body that is
                          not the JSON the endpoint promises; nothing in it may be acted on
AmbiguousOutcomeError     reconcile with the exchange before anything else (the order may or
                          may not have been accepted)
RejectedError             not retry the same request (the exchange or the risk guard refused)
DataQualityError          quarantine the data (no new entries on it), alert, carry on
ModelError                fall back to the V1 rule engine for this decision
FatalError                stop trading and alert a human
========================  ==================================================================
"""

from __future__ import annotations


class ServingError(Exception):
    """Root of every error raised by ``serving``."""


class RetryableError(ServingError):
    """A transient failure; the same request may be retried (with backoff)."""


class MalformedResponseError(RetryableError):
    """The exchange answered with a body that is not what the endpoint promises (HTTP 200 with a
    truncated, empty or wrongly shaped JSON body, or a record missing a required field).

    It is *unknown*, never evidence of anything (an empty position list read from a truncated
    body is not a flat position). ``raw`` keeps the offending record or body (at most 500
    characters) for the log; the message names the endpoint and the field.
    """

    def __init__(self, message: str, raw: object = None) -> None:
        text = repr(raw)
        self.raw = text if len(text) <= 500 else text[:500] + "..."
        super().__init__(f"{message}; raw: {self.raw}" if raw is not None else message)


class AmbiguousOutcomeError(ServingError):
    """The outcome of a request is unknown; reconcile state with the exchange before acting again."""


class RejectedError(ServingError):
    """The request was refused (exchange rule, risk limit); retrying it unchanged will not help."""


class DataQualityError(ServingError):
    """Market data failed validation; quarantine it (no new entries based on it)."""


class ModelError(ServingError):
    """The V2 stack failed (load, exception, non-finite output, deadline); use the fallback policy."""


class FatalError(ServingError):
    """An unrecoverable state (e.g. unreconcilable position); stop trading and alert."""
