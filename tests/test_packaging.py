"""The install (``make install``: ``pip install -e '.[dev]'``) prints no setuptools deprecation warning or
editable-install notice: PEP 639 licence metadata, and a layout setuptools installs with a plain .pth file."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

_BUILD = """
import json, sys, warnings
from setuptools import build_meta
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    build_meta.build_editable(sys.argv[1])
print(json.dumps([f"{w.category.__name__}: {str(w.message).strip().splitlines()[0]}" for w in caught]))
"""


def test_licence_metadata_uses_the_current_form():
    project = PYPROJECT["project"]
    assert isinstance(project["license"], str) and "license-files" in project  # PEP 639, not the {text=...} table
    requires = PYPROJECT["build-system"]["requires"]
    floor = next(r for r in requires if r.startswith("setuptools"))
    assert tuple(map(int, re.findall(r"\d+", floor)[:1])) >= (77,)  # the first setuptools that reads PEP 639


def test_editable_build_emits_no_setuptools_warning(tmp_path):
    """Build the editable wheel of a copy of the project's metadata and package layout (empty packages),
    as pip does inside ``make install``, and collect every warning setuptools emits."""
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 (the install's build environment gets a newer one)")
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    packages = [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
    for package in packages:
        (project / package).mkdir()
        (project / package / "__init__.py").write_text("")
    (project / "tests").mkdir()  # a folder named like no package, as in the repository
    done = subprocess.run([sys.executable, "-c", _BUILD, str(tmp_path / "wheel")], cwd=project, capture_output=True,
                          check=False, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    caught = json.loads(done.stdout.strip().splitlines()[-1])
    assert caught == [], caught
    assert list((tmp_path / "wheel").glob("ats-*.whl"))
