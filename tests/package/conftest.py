"""Shared by the tests of the Python package (tests/package).

Environment (set by ctest, tests/CMakeLists.txt): PYTHONPATH holds build/python (the package
with its generated _paths.py), TM_FIXTURES the generated fixtures, TORCHMERGE_BIN the CLI,
TORCHMERGE_BUILD_DIR the build tree (for the install test), TM_REALWORLD_DIR_DEFAULT the corpus
(TM_REALWORLD_DIR in the environment overrides it). Run by hand:
  PYTHONPATH=build/python TORCHMERGE_BIN=build/torchmerge /usr/bin/python3 -m pytest tests/package
(fixtures are then generated into a temporary folder).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    d = os.environ.get("TM_FIXTURES")
    if d and Path(d, "sd_a.pt").exists():
        return Path(d)
    out = tmp_path_factory.mktemp("fixtures")
    subprocess.run([sys.executable, str(ROOT / "tests" / "fixtures" / "make_fixtures.py"), str(out)], check=True)
    return out


def realworld_dir():
    d = os.environ.get("TM_REALWORLD_DIR") or os.environ.get("TM_REALWORLD_DIR_DEFAULT")
    if d and Path(d, "MANIFEST.tsv").exists():
        return Path(d)
    return None
