"""Shared by every CLI test file in this folder.

Inputs are never modified: the session's input folders (the fixtures of test_cli.py, the
inputs of test_formats.py, test_hostile.py and test_failure_injection.py) are watched around
every test (size, mtime, ctime and inode of each file must not change, no file may vanish),
and at the end of the session every input file is hashed again and compared with the sha256
it had when first seen.

The hostile-input count of test_hostile.py is printed in the terminal summary.
"""
import collections
import hashlib
import os
from pathlib import Path

import pytest

INPUT_DIRS = ("fixtures", "format_inputs", "hostile_bases", "failure_inputs")
MAX_WATCHED = 64 << 20  # bigger files (failure_inputs' 50 MB models) are hashed by their tests

HOSTILE_COUNTS = collections.Counter()
_first_sha = {}


def count_hostile(category: str, n: int) -> None:
    HOSTILE_COUNTS[category] += n


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _snapshot(base: Path) -> dict:
    snap = {}
    if not base.is_dir():
        return snap
    for d in base.iterdir():
        # pytest's "<name>current" links point at the newest folder of that name: skip them
        if d.is_symlink() or not (d.is_dir() and d.name.startswith(INPUT_DIRS)):
            continue
        for dirpath, _, files in os.walk(d):
            for name in files:
                p = Path(dirpath) / name
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    continue
                if not os.path.islink(p) and st.st_size <= MAX_WATCHED:
                    snap[p] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    return snap


@pytest.fixture(autouse=True)
def _inputs_are_never_modified(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    before = _snapshot(base)
    yield
    after = _snapshot(base)
    changed = [str(p) for p, sig in before.items() if after.get(p) != sig]
    for p in after:
        if p not in _first_sha:
            _first_sha[p] = _sha256(p)
    if changed:
        pytest.fail("input files were modified or removed by this test: %s" % ", ".join(changed[:10]))


def pytest_sessionfinish(session, exitstatus):
    bad = []
    for p, sha in _first_sha.items():
        if not p.exists():
            continue  # the session's own cleanup
        if _sha256(p) != sha:
            bad.append(str(p))
    if bad:
        session.config._tm_modified_inputs = bad
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bad = getattr(config, "_tm_modified_inputs", None)
    if bad:
        terminalreporter.write_line("INPUTS MODIFIED (sha256 differs from when first seen): %s"
                                    % ", ".join(bad[:10]), red=True)
    if _first_sha:
        terminalreporter.write_line("inputs checked unmodified (sha256): %d files" % len(_first_sha))
    if HOSTILE_COUNTS:
        total = sum(HOSTILE_COUNTS.values())
        terminalreporter.write_line(
            "hostile inputs: %d distinct (%s), each refused cleanly by inspect and merge" % (
                total, ", ".join("%s %d" % kv for kv in sorted(HOSTILE_COUNTS.items()))))
