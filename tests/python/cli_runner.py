"""Running the torchmerge CLI from the tests: the binary (env TORCHMERGE_BIN, default
build/torchmerge), its result, and the assertions every CLI test file makes on it."""
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("TORCHMERGE_BIN", str(REPO / "build" / "torchmerge")))
ERROR_PREFIX = "torchmerge: error: "
# Tests of what only libtorchmerge_torch.so does (rebuilding TorchScript modules, greedy soup,
# in-memory state dicts): skipped in a build configured with -DTORCHMERGE_WITH_TORCH=OFF
# (tests/CMakeLists.txt passes TORCHMERGE_WITH_TORCH=0), where tests/build_without_torch.sh
# checks the error they get instead.
needs_torch_half = pytest.mark.skipif(os.environ.get("TORCHMERGE_WITH_TORCH") == "0",
                                      reason="built with -DTORCHMERGE_WITH_TORCH=OFF: no libtorchmerge_torch.so")
WARNING_PREFIX = "torchmerge: warning: "


@dataclass
class Result:
    args: list
    rc: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self):
        return [l for l in self.stderr.splitlines() if l.strip()]

    @property
    def warnings(self):
        return [l for l in self.stderr_lines if l.startswith(WARNING_PREFIX)]

    @property
    def errors(self):
        return [l for l in self.stderr_lines if l.startswith(ERROR_PREFIX)]

    def describe(self) -> str:
        return "torchmerge %s\n-> exit %d\nstdout:\n%s\nstderr:\n%s" % (
            " ".join(self.args), self.rc, self.stdout, self.stderr)


def require_binary() -> None:
    if not (BIN.is_file() and os.access(str(BIN), os.X_OK)):
        pytest.fail("torchmerge binary not found at %s (build it, or set TORCHMERGE_BIN)" % BIN)


def tm(*args, cwd, env=None) -> Result:
    """Runs the CLI in cwd; env adds to (or overrides) the environment."""
    require_binary()
    argv = [str(a) for a in args]
    env = dict(os.environ, LC_ALL="C", **(env or {}))
    p = subprocess.run([str(BIN)] + argv, cwd=str(cwd), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=300)
    return Result(argv, p.returncode, p.stdout.decode("utf-8", "replace"),
                  p.stderr.decode("utf-8", "replace"))


def assert_ok(res: Result) -> None:
    assert res.rc == 0, res.describe()
    assert not res.errors, res.describe()


def assert_error(res: Result, *needles, rc=1, one_line=True) -> str:
    """Exit status rc, exactly one 'torchmerge: error: ' line containing every needle (and,
    with one_line, nothing else on stderr). Returns the error line."""
    assert res.rc == rc, res.describe()
    assert len(res.errors) == 1, "expected one error line\n" + res.describe()
    if one_line:
        assert res.stderr_lines == res.errors, "stderr is not a single line\n" + res.describe()
    for line in res.stderr_lines:
        assert line.startswith("torchmerge: "), res.describe()
    line = res.errors[0]
    for needle in needles:
        assert needle in line, "%r not in the error line\n%s" % (needle, res.describe())
    return line
