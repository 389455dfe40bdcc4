"""The HTML report renders in headless Chromium (Debian's chromium package; `.ci/run` installs it)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

CHROMIUM = shutil.which("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI installs it in .ci/run)")
def test_report_renders_in_headless_chromium(smoke_run, tmp_path):
    report = smoke_run / "report" / "report.html"
    dom = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", report.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    assert "ats test-period report" in dom and "buy_and_hold" in dom
    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1200,1600", report.as_uri()],
        capture_output=True, timeout=120, check=True,
    )
    assert shot.stat().st_size > 20_000  # a rendered page with the plot, not a blank image
