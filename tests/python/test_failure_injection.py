"""Nothing is lost when a merge fails half-way: interrupted by a signal, or out of disk space.

    TORCHMERGE_BIN=build/torchmerge /usr/bin/python3 -m pytest -q tests/python/test_failure_injection.py

The merges here are big enough to be interrupted (8 inputs of about 50 MB, generated once per
session). After every failure:
 - the exit is by the signal (or a non-zero status), or status 1 with one error line naming
   the output for a full disk,
 - no temporary file ('.OUT.tmp.*') is left in the output folder, nor a folder output's
   temporary folder with the shards written so far,
 - an existing OUT (file or folder) is untouched byte for byte,
 - the inputs are unchanged (sha256, checked at the end; conftest.py also watches them).
A full disk is simulated with RLIMIT_FSIZE (SIGXFSZ ignored, so writes fail with EFBIG), then,
when this process may mount (root), with real 1 MiB and 24 MiB tmpfs.
"""
import glob
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cli_runner import BIN, ERROR_PREFIX, needs_torch_half, require_binary  # noqa: E402

N_INPUTS = 8
TENSORS, ROWS = 12, 1100  # 12 x 1100 x 1024 float32: about 54 MB per input
PRECIOUS = b"an existing output that a failed merge must not touch\n" * 10


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class BigInputs:
    def __init__(self, d: Path):
        self.dir = d
        self.paths = []
        for k in range(N_INPUTS):
            g = torch.Generator().manual_seed(100 + k)
            sd = {"layers.%d.weight" % j: torch.randn(ROWS, 1024, generator=g) for j in range(TENSORS)}
            p = d / ("big_%d.pt" % k)
            torch.save(sd, str(p))
            self.paths.append(p)
        self.hashes = {p: sha256(p) for p in self.paths}


@pytest.fixture(scope="session")
def big(tmp_path_factory):
    return BigInputs(tmp_path_factory.mktemp("failure_inputs"))


def leftovers(folder: Path, out_name: str):
    return sorted(os.path.basename(p) for p in glob.glob(str(folder / (".%s.tmp.*" % out_name))))


def start(args, cwd, preexec_fn=None):
    require_binary()
    env = dict(os.environ, LC_ALL="C")
    return subprocess.Popen([str(BIN)] + [str(a) for a in args], cwd=str(cwd), env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=preexec_fn)


def interrupt(p, folder: Path, out_name: str, sig: int, delay: float) -> bool:
    """Sends sig delay seconds after the temporary output appears; False when the merge had
    already finished (too fast to interrupt)."""
    t_end = time.monotonic() + 30
    while p.poll() is None and not leftovers(folder, out_name) and time.monotonic() < t_end:
        time.sleep(0.001)
    time.sleep(delay)
    if p.poll() is not None:
        return False
    p.send_signal(sig)
    return True


# ---- signals -------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2])
@pytest.mark.parametrize("out_name", ["out.pt", "out.safetensors"])
def test_signal_mid_merge_leaves_nothing_behind(big, tmp_path, sig, delay, out_name):
    out = tmp_path / out_name
    out.write_bytes(PRECIOUS)
    for attempt in range(3):
        # Each input twice: the merge now outruns a 0.2 s signal on 8 inputs.
        p = start(["simple_average", "-q", "-o", out] + big.paths * 2, tmp_path)
        hit = interrupt(p, tmp_path, out_name, sig, delay / (attempt + 1))
        _, err = p.communicate(timeout=60)
        if hit and p.returncode != 0:
            break
        # Finished first (also when it exited between the last poll and the signal, which then
        # reached a process already done): a whole output and no temporary. Try again, sooner.
        assert p.returncode == 0, err.decode()
        assert leftovers(tmp_path, out_name) == [], "temporary output left behind"
        out.write_bytes(PRECIOUS)
    else:
        pytest.skip("the merge always finished within %.2fs: too fast to interrupt" % delay)
    rc = p.returncode
    assert rc == -sig or rc not in (0, None), "exit status %s after %s" % (rc, sig.name)
    assert leftovers(tmp_path, out_name) == [], "temporary output left behind"
    if out.read_bytes() != PRECIOUS:
        # The signal landed after the rename: the merge had completed, so OUT must be whole.
        assert out.read_bytes()[:2] in (b"PK",) or out_name.endswith(".safetensors"), "partial output"
        if out_name.endswith(".pt"):
            torch.load(out, weights_only=True)
    assert sorted(os.listdir(tmp_path)) == [out_name]


def test_signal_before_any_output_exists(big, tmp_path):
    """No OUT yet: after the signal there is still none, and no temporary file."""
    p = start(["simple_average", "-q", "-o", tmp_path / "fresh.pt"] + big.paths, tmp_path)
    if not interrupt(p, tmp_path, "fresh.pt", signal.SIGINT, 0.02):
        pytest.skip("the merge finished before the signal")
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGINT
    assert os.listdir(tmp_path) == []


# ---- signals on the LibTorch paths (libtorchmerge_torch.so writes the output) ---------------
# Its temporary files must be in the table the CLI's signal handler empties: before the torch
# half linked libtorchmerge.so, it had a table of its own and these left `.OUT.tmp.*` behind.

MODULE_LAYERS = 16  # 16 x Linear(1024, 1024): about 67 MB per module


class BigModules:
    """Three TorchScript modules of about 67 MB (issue 12 saw the leak with three of 134 MB)."""

    def __init__(self, d: Path):
        self.paths = []
        for k in range(3):
            torch.manual_seed(200 + k)
            net = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(MODULE_LAYERS)])
            p = d / ("module_%d.pt" % k)
            torch.jit.save(torch.jit.script(net.eval()), str(p))
            self.paths.append(p)


@pytest.fixture(scope="session")
def big_modules(tmp_path_factory):
    return BigModules(tmp_path_factory.mktemp("failure_inputs_modules"))


def signal_during_write(argv, folder: Path, out_name: str, start_fn=start):
    """Runs argv and sends SIGINT as soon as the temporary output exists (the torch half
    writes it last, in one go: there is no delay to shorten); three attempts, then
    (None, None) when every one finished first."""
    for _ in range(3):
        p = start_fn(argv, folder)
        hit = interrupt(p, folder, out_name, signal.SIGINT, 0.0)
        _, err = p.communicate(timeout=120)
        if hit and p.returncode != 0:
            return p, err
        assert p.returncode == 0, err.decode()  # finished first (also just before the signal)
        assert leftovers(folder, out_name) == [], "temporary output left behind"
        os.remove(folder / out_name)
    return None, None


@needs_torch_half
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_signal_during_torchscript_dtype_output_leaves_nothing_behind(big_modules, tmp_path, existing):
    """--dtype rebuilds the module with LibTorch (libtorchmerge_torch's module writer)."""
    out = tmp_path / "out.pt"
    if existing:
        out.write_bytes(PRECIOUS)
    argv = ["simple_average", "-q", "--dtype", "float16", "-o", out] + big_modules.paths
    p, err = signal_during_write(argv, tmp_path, "out.pt")
    if p is None:
        pytest.skip("the module was always written before the signal")
    assert p.returncode == -signal.SIGINT, "exit status %s\n%s" % (p.returncode, err.decode())
    assert leftovers(tmp_path, "out.pt") == [], "temporary output left behind"
    if existing and out.read_bytes() != PRECIOUS:
        torch.jit.load(str(out))  # the signal landed after the rename: OUT is whole
    assert sorted(os.listdir(tmp_path)) == (["out.pt"] if existing else [])


SAVE_STATE_DICT = os.environ.get("TORCHMERGE_SAVE_STATE_DICT_BIN")


@needs_torch_half
@pytest.mark.parametrize("fmt", ["pt", "torchscript"])
def test_signal_during_state_dict_save_leaves_nothing_behind(big_modules, tmp_path, fmt):
    """tm_state_dict_save (libtorchmerge_torch) from tests/save_state_dict.c, which handles
    signals as the CLI does."""
    if not SAVE_STATE_DICT:
        pytest.skip("TORCHMERGE_SAVE_STATE_DICT_BIN is not set (ctest sets it)")

    def start_save(argv, cwd):
        return subprocess.Popen([SAVE_STATE_DICT] + [str(a) for a in argv], cwd=str(cwd),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    p, err = signal_during_write([big_modules.paths[0], tmp_path / "out.pt", fmt], tmp_path, "out.pt",
                                 start_fn=start_save)
    if p is None:
        pytest.skip("the state dict was always saved before the signal")
    assert p.returncode == -signal.SIGINT, "exit status %s\n%s" % (p.returncode, err.decode())
    assert os.listdir(tmp_path) == [], "left behind: %s" % os.listdir(tmp_path)


SHARDS = ["--max-shard-size", "10MB"]  # six shards of two tensors: files of several kinds in the folder


def folder_state(folder: Path):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))}


def assert_complete_folder(folder: Path):
    """A folder output that is all there: the index names every shard, each one whole."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert sorted(os.listdir(folder)) == sorted(shards + ["model.safetensors.index.json"])
    for s in shards:
        data = (folder / s).read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        end = max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__")
        assert len(data) == 8 + n + end, "%s is truncated" % s


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.1])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_signal_during_folder_output_leaves_nothing_behind(big, tmp_path, existing, delay):
    """The temporary folder and every shard in it go; an existing folder OUT is untouched, or
    (signal after the rename) replaced whole."""
    out = tmp_path / "soup"
    precious = {"precious.txt": PRECIOUS}
    for attempt in range(3):
        if existing:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            (out / "precious.txt").write_bytes(PRECIOUS)
        p = start(["simple_average", "-q"] + SHARDS + ["-o", str(out) + "/"] + big.paths, tmp_path)
        hit = interrupt(p, tmp_path, "soup", signal.SIGINT, delay / (attempt + 1))
        _, err = p.communicate(timeout=60)
        if hit and p.returncode != 0:
            break
        assert p.returncode == 0, err.decode()  # finished first (see the test above): again, sooner
        assert_complete_folder(out)
        shutil.rmtree(out)
    else:
        pytest.skip("the merge always finished within %.2fs: too fast to interrupt" % delay)
    assert p.returncode == -signal.SIGINT, "exit status %s\n%s" % (p.returncode, err.decode())
    left = sorted(os.listdir(tmp_path))
    if not existing and left == []:
        return
    assert left == ["soup"], "left behind: %s" % left
    if not (existing and folder_state(out) == precious):
        assert_complete_folder(out)  # the signal landed after the rename


def test_input_truncated_during_the_merge_leaves_nothing_behind(big, tmp_path):
    """Another process shrinks an input while it is being read (mapped)."""
    victim = tmp_path / "victim.pt"
    shutil.copyfile(big.paths[0], victim)
    work = tmp_path / "work"
    work.mkdir()
    p = start(["simple_average", "-q", "-o", work / "out.pt", victim] + big.paths[1:], work)
    t_end = time.monotonic() + 30
    while p.poll() is None and not leftovers(work, "out.pt") and time.monotonic() < t_end:
        time.sleep(0.001)
    os.truncate(victim, 4096)
    p.communicate(timeout=60)
    assert p.returncode != 0
    assert os.listdir(work) == [], "left behind: %s" % os.listdir(work)


# ---- a full disk ---------------------------------------------------------------------------

def fsize_limit(nbytes, ignore_sigxfsz=True):
    def pre():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
        if ignore_sigxfsz:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return pre


def assert_clean_error(p, err: bytes, needle: str):
    lines = [l for l in err.decode("utf-8", "replace").splitlines() if l.strip()]
    assert p.returncode == 1, "exit %s\n%s" % (p.returncode, err.decode())
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err.decode()
    assert needle in lines[0], "%r not in %r" % (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("out_name", ["out.pt", "out.safetensors"])
@pytest.mark.parametrize("limit", [0, 4096, 1 << 20, 40 << 20])
def test_file_size_limit_is_a_clean_error(big, tmp_path, out_name, limit):
    out = tmp_path / out_name
    out.write_bytes(PRECIOUS[:min(len(PRECIOUS), limit)] if limit else b"")
    before = out.read_bytes()
    p = start(["simple_average", "-q", "-o", out] + big.paths, tmp_path, preexec_fn=fsize_limit(limit))
    _, err = p.communicate(timeout=120)
    line = assert_clean_error(p, err, out_name)
    assert "too large" in line.lower() or "space" in line.lower() or "write" in line.lower(), line
    assert leftovers(tmp_path, out_name) == []
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [out_name]


def test_file_size_limit_without_ignoring_sigxfsz(big, tmp_path):
    """The shell's `ulimit -f` as users meet it: SIGXFSZ has its default action."""
    out = tmp_path / "out.pt"
    out.write_bytes(PRECIOUS)
    p = start(["simple_average", "-q", "-o", out] + big.paths, tmp_path,
              preexec_fn=fsize_limit(1 << 20, ignore_sigxfsz=False))
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert leftovers(tmp_path, "out.pt") == [], "temporary output left behind"
    assert out.read_bytes() == PRECIOUS
    assert_clean_error(p, err, "out.pt")


def test_file_size_limit_with_torchscript_output(tmp_path):
    """TorchScript output is written by LibTorch: a failed write is still one clean error."""
    src = tmp_path / "src"
    src.mkdir()
    for k in range(2):
        torch.manual_seed(k)
        torch.jit.save(torch.jit.script(torch.nn.Linear(64, 64)), str(src / ("m%d.pt" % k)))
    work = tmp_path / "work"
    work.mkdir()
    p = start(["simple_average", "-q", "-o", work / "soup.pt", src / "m0.pt", src / "m1.pt"], work,
              preexec_fn=fsize_limit(2048))
    _, err = p.communicate(timeout=300)
    assert_clean_error(p, err, "soup.pt")
    assert os.listdir(work) == []


@pytest.mark.parametrize("limit", [0, 4096, 1 << 20])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_file_size_limit_with_folder_output(big, tmp_path, existing, limit):
    """A shard that cannot be written: one error line, the temporary folder removed, an existing
    folder untouched."""
    out = tmp_path / "soup"
    if existing:
        out.mkdir()
        (out / "precious.txt").write_bytes(PRECIOUS)
        before = folder_state(out)
    p = start(["simple_average", "-q"] + SHARDS + ["-o", str(out) + "/"] + big.paths, tmp_path,
              preexec_fn=fsize_limit(limit))
    _, err = p.communicate(timeout=120)
    assert_clean_error(p, err, "soup/model-00001-of-00006.safetensors")
    assert sorted(os.listdir(tmp_path)) == (["soup"] if existing else [])
    if existing:
        assert folder_state(out) == before


def mounted_tmpfs(tmp_path, size: str):
    d = tmp_path / "tmpfs"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", str(d)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (%s): the RLIMIT_FSIZE tests cover a full disk"
                    % r.stdout.decode().strip())
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    yield from mounted_tmpfs(tmp_path, "1m")


@pytest.fixture
def small_tmpfs(tmp_path):
    """Room for two 9 MB shards, not three."""
    yield from mounted_tmpfs(tmp_path, "24m")


@pytest.mark.parametrize("out_name", ["out.pt", "out.safetensors"])
def test_full_tmpfs_is_a_clean_error(big, tiny_tmpfs, out_name):
    out = tiny_tmpfs / out_name
    out.write_bytes(PRECIOUS)
    p = start(["simple_average", "-q", "-o", out] + big.paths, tiny_tmpfs)
    _, err = p.communicate(timeout=120)
    line = assert_clean_error(p, err, out_name)
    assert "space" in line.lower(), line
    assert leftovers(tiny_tmpfs, out_name) == []
    assert out.read_bytes() == PRECIOUS
    assert sorted(os.listdir(tiny_tmpfs)) == [out_name]


def test_full_tmpfs_during_folder_output(big, small_tmpfs):
    """The disk fills up after two shards are written: they are removed with their folder."""
    p = start(["simple_average", "-q"] + SHARDS + ["-o", str(small_tmpfs / "soup") + "/"] + big.paths, small_tmpfs)
    _, err = p.communicate(timeout=120)
    line = assert_clean_error(p, err, "soup/model-00003-of-00006.safetensors")
    assert "space" in line.lower(), line
    assert os.listdir(small_tmpfs) == []


# ---- the inputs ----------------------------------------------------------------------------

def test_inputs_never_modified(big):
    """Runs after the tests above: every failed merge left its inputs as they were."""
    for p, h in big.hashes.items():
        assert sha256(p) == h, "%s was modified" % p.name
