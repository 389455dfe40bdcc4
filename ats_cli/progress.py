"""The progress bar of the ``ats`` commands: every count is shown with what it counts."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class CountColumn(ProgressColumn):
    """``done/total unit``, e.g. ``1,000/1,000 decided bars``; the unit is the task's ``unit`` field
    (``progress.add_task(..., unit="env steps")``)."""

    def render(self, task: Task) -> Text:
        """The count text of ``task``."""
        count = f"{task.completed:,.0f}" + (f"/{task.total:,.0f}" if task.total is not None else "")
        unit = str(task.fields.get("unit", ""))
        return Text(f"{count} {unit}".rstrip())


def counting_progress(console: Console) -> Progress:
    """A rich progress display: description, bar, ``done/total unit`` (:class:`CountColumn`), elapsed
    time and ETA. Give each task a ``unit`` (what one step of ``completed`` is)."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), CountColumn(),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
    )
