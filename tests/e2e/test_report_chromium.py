"""The HTML reports render in headless Chromium (Debian's chromium package; `.ci/run` installs it)
without console errors."""

from __future__ import annotations

import pytest

from tests.kit.chromium import CHROMIUM, render

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI installs it in .ci/run)")


@needs_chromium
def test_report_renders_in_headless_chromium(smoke_run, tmp_path):
    page = render(smoke_run / "report" / "report.html", tmp_path)
    assert "ats test-period report" in page.dom and "buy_and_hold" in page.dom
    assert page.console == []  # no script error, no failed resource, nothing logged
    assert page.screenshot_bytes > 20_000  # a rendered page with the plot, not a blank image


@needs_chromium
def test_the_console_check_sees_a_script_error(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>undefinedFn();</script></body></html>")
    assert any("undefinedFn" in m for m in render(bad, tmp_path).console)
