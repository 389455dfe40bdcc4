"""Expected errors of the ``ats`` command line: one message and exit code 2 instead of a traceback.

An *expected* error is a mistake in what the user gave the command or in its surroundings, not a
bug: a config file missing or invalid, an input file missing or unreadable, data that breaks a
validation rule, an instrument spec that is missing or does not fit the data, a bundle that does not
load, missing or exposed credentials, an exchange that cannot be set up. :func:`expected_hint` is
the one place that says which exceptions these are and what to do about each;
:class:`ExpectedErrorGroup` (the ``ats`` command group) prints them with :func:`report` and exits
with code 2. Anything else keeps its traceback. ``ats --debug ...`` or
``ATS_DEBUG=1`` shows the traceback of expected errors too.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

EXIT_CODE = 2
"""Exit code of an expected error (the code click uses for usage errors)."""

DEBUG_ENV = "ATS_DEBUG"
"""Environment variable that, set to anything but ``""``/``0``, shows tracebacks of expected errors."""

_FILE_HINT = "check the path (a relative path starts at the current directory)"
_BUNDLE_HINT = ("give --bundle the bundle folder of a run trained by this version of ats "
                "(`ats train --out RUN` writes RUN/bundle)")

# (module, class, what to do); the first entry the exception is an instance of wins, so subclasses
# come before their bases. A class whose module was never imported cannot have been raised, so it
# is looked up in sys.modules instead of being imported here (that would import torch and friends).
_EXPECTED: tuple[tuple[str, str, str | None], ...] = (
    ("training.config", "ConfigError", "check the path, or fix the key named above (configs/*.yaml show every key)"),
    ("market.errors", "DataValidationError",
     "fix or replace the data file; `ats data check FILE` reports every rule it breaks"),
    ("market.instruments", "InstrumentSpecError", None),  # the message names the symbol and the ways to give a spec
    ("agents.ensemble", "EnsembleError", None),  # members that cannot form an ensemble: the message names them
    ("regime.hmm", "ModelLoadError", _BUNDLE_HINT),  # agents.bundle.load_bundle raises it for any bundle problem
    ("serving.hotswap", "BundleRejected", _BUNDLE_HINT),
    ("serving.errors", "FatalError", None),  # credentials, .env permissions, arming, exchange set-up: the message says
    ("builtins", "FileNotFoundError", _FILE_HINT),
    ("builtins", "NotADirectoryError", _FILE_HINT),
    ("builtins", "IsADirectoryError", _FILE_HINT),
    ("builtins", "PermissionError", "check the permissions of the file named above"),
)


def expected_hint(exc: BaseException) -> str | None:
    """What to do about ``exc`` if it is an expected error ("" when its message says it), else None."""
    for module, name, hint in _EXPECTED:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return hint or ""
    return None


def format_error(exc: BaseException, hint: str | None = None) -> str:
    """Rich markup of the message shown for ``exc``: what went wrong (with where), what to do, and how to
    see the traceback. ``hint`` defaults to :func:`expected_hint`'s."""
    hint = expected_hint(exc) if hint is None else hint
    lines = [f"[bold red]error[/]: {escape(str(exc) or type(exc).__name__)}"]
    if hint:
        lines.append(f"  what to do: {escape(hint)}")
    lines.append(f"  [dim]({type(exc).__name__}; `ats --debug ...` or {DEBUG_ENV}=1 shows the traceback)[/]")
    return "\n".join(lines)


def debug_requested(ctx: typer.Context | None = None) -> bool:
    """Whether tracebacks of expected errors are wanted: ``ats --debug`` (the root command's ``debug``
    parameter in ``ctx``) or the :data:`DEBUG_ENV` environment variable."""
    if ctx is not None and ctx.find_root().params.get("debug"):
        return True
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


_stderr = Console(stderr=True)


def report(exc: BaseException, ctx: typer.Context | None = None, hint: str | None = None) -> NoReturn:
    """End the command on ``exc``, an error the caller knows to be expected: print :func:`format_error`
    on stderr and exit with :data:`EXIT_CODE`; with :func:`debug_requested`, re-raise it instead.

    Call it from an ``except`` block (``raise`` semantics: the traceback is the original one).
    """
    if debug_requested(ctx):
        raise exc
    _stderr.print(format_error(exc, hint), soft_wrap=True)
    raise typer.Exit(EXIT_CODE) from None


class ExpectedErrorGroup(TyperGroup):
    """The ``ats`` command group: a sub-command that raises an expected error (:func:`expected_hint`)
    ends with :func:`report`'s message and exit code 2; other exceptions pass through unchanged."""

    def invoke(self, ctx: Any) -> Any:
        """Run the sub-command; report expected errors (see the class docstring)."""
        try:
            return super().invoke(ctx)
        except Exception as exc:
            hint = expected_hint(exc)
            if hint is None:
                raise
            report(exc, ctx, hint)
