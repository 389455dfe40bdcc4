"""Render an HTML file in headless Chromium (Debian's package) and collect what a reader would see."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = shutil.which("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
_CONSOLE = re.compile(r":CONSOLE[:(]\d+\)?\] (.*)")


@dataclass(frozen=True)
class Rendered:
    dom: str  # the DOM after load (``--dump-dom``)
    console: list[str]  # every console message of the page (errors, uncaught exceptions, logs)
    screenshot_bytes: int


def render(page: Path, workdir: Path) -> Rendered:
    """Load ``page`` twice in headless Chromium: once to dump the DOM and the console messages,
    once for a 1200 x 1600 screenshot. Raises ``subprocess.CalledProcessError`` if Chromium fails."""
    if CHROMIUM is None:
        raise RuntimeError("chromium not installed")
    profile = f"--user-data-dir={workdir / 'chromium-profile'}"
    done = subprocess.run([CHROMIUM, *FLAGS, profile, "--enable-logging=stderr", "--v=0", "--dump-dom",
                           page.resolve().as_uri()], capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    console = [m.group(1) for m in map(_CONSOLE.search, done.stderr.splitlines()) if m]
    shot = workdir / "page.png"
    subprocess.run([CHROMIUM, *FLAGS, profile, f"--screenshot={shot}", "--window-size=1200,1600",
                    page.resolve().as_uri()], capture_output=True, timeout=120, check=True)  # fmt: skip
    return Rendered(done.stdout, console, shot.stat().st_size)
