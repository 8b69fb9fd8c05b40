"""cmake --install into a temporary prefix, then the installed package imported from a fresh
Python with only PYTHONPATH pointing at the prefix's site-packages: it finds the installed
libtorchmerge.so and the installed CLI through the _paths.py written at install time."""
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(not os.environ.get("TORCHMERGE_BUILD_DIR"), reason="TORCHMERGE_BUILD_DIR not set (ctest sets it)")
def test_installed_package_finds_the_installed_library(fx, tmp_path):
    prefix = tmp_path / "prefix"
    r = subprocess.run(["cmake", "--install", os.environ["TORCHMERGE_BUILD_DIR"], "--prefix", str(prefix)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sites = [p.parent for p in prefix.rglob("torchmerge/__init__.py")]
    assert len(sites) == 1, sites
    site = sites[0].parent
    paths = (site / "torchmerge" / "_paths.py").read_text()
    assert str(prefix) in paths
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHMERGE_LIB_DIR", "TORCHMERGE_BIN", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    code = ("import torchmerge, torch; sd = torchmerge.load(%r); ref = torch.load(%r); "
            "assert all(torch.equal(sd[k], ref[k]) for k in ref); "
            "print(torchmerge.__file__); print(torchmerge._lib.lib._name); print(torchmerge.find_cli())"
            % (str(fx / "sd_a.pt"), str(fx / "sd_a.pt")))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    pkg, lib, cli = r.stdout.split()
    for p in (pkg, lib, cli):
        assert Path(p).resolve().is_relative_to(prefix.resolve()), (p, prefix)
    r = subprocess.run([sys.executable, "-m", "torchmerge", "--version"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
