"""The distributed merge's loopback row: 3 ranks × 2 inputs (fp32, ~240 MB each) merged with
`torchmerge simple_average --distributed` on 127.0.0.1, against the single-host merge of the 6
files. Prints wall time, the bytes that moved between ranks (the block sums' payload, and what the
loopback interface counted), each rank's peak RSS, and whether both outputs are byte-identical.

usage: bench_distributed.py [--work DIR] [--bin build/torchmerge] [--runs 3]"""
import argparse
import os
import socket
import statistics
import subprocess
import time
from pathlib import Path

import torch

ELEMS = 15 * 2000 * 2000  # 60 M float32 elements: 240 MB per input


def make_inputs(work: Path):
    paths = []
    for i in range(6):
        p = work / ("in%d.pt" % i)
        if not p.exists():
            g = torch.Generator().manual_seed(i)
            torch.save({"layer%d.weight" % j: torch.randn((2000, 2000), generator=g) for j in range(15)}, p)
        paths.append(p)
    return paths


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lo_bytes():
    for line in Path("/proc/net/dev").read_text().splitlines():
        if line.strip().startswith("lo:"):
            return int(line.split(":")[1].split()[0])
    return 0


def timed(cmd, rss_file, **kw):
    """cmd under GNU time, which records its peak RSS in rss_file (a child forked from this big
    Python process would report the Python's RSS before exec, so wait4 cannot)."""
    return subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] + cmd, **kw)


def wait_rss(p, rss_file):
    """(returncode, peak RSS in MiB) of a child started by timed()."""
    rc = p.wait()
    return rc, int(Path(rss_file).read_text().split()[-1]) / 1024


def run_distributed(bin_, ins, out):
    port = free_port()
    procs = []
    before = lo_bytes()
    t0 = time.monotonic()
    for r in range(3):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(timed([bin_, "simple_average", "-q", "--distributed", "--timeout", "120",
                            "-o", str(out) if r == 0 else str(out) + ".rank%d" % r,
                            str(ins[2 * r]), str(ins[2 * r + 1])], "%s.rss%d" % (out, r), env=env))
    results = [wait_rss(p, "%s.rss%d" % (out, r)) for r, p in enumerate(procs)]
    wall = time.monotonic() - t0
    moved = lo_bytes() - before
    assert all(rc == 0 for rc, _ in results), results
    return wall, moved, [rss for _, rss in results]


def run_single(bin_, ins, out):
    t0 = time.monotonic()
    p = timed([bin_, "simple_average", "-q", "-o", str(out)] + [str(x) for x in ins], str(out) + ".rss")
    rc, rss = wait_rss(p, str(out) + ".rss")
    assert rc == 0
    return time.monotonic() - t0, rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/torchmerge-bench/distributed")
    ap.add_argument("--bin", default=str(Path(__file__).resolve().parents[1] / "build" / "torchmerge"))
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ins = make_inputs(work)
    for p in ins:  # warm page cache, as the single-host rows
        subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=True)
    dist, single = [], []
    for _ in range(a.runs):
        dist.append(run_distributed(a.bin, ins, work / "dist.pt"))
        single.append(run_single(a.bin, ins, work / "single.pt"))
    identical = (work / "dist.pt").read_bytes() == (work / "single.pt").read_bytes()
    payload = ELEMS * 8 * 3  # float64 sums: rank 0 → 1 → 2 → 0
    med = statistics.median
    print("\n### Distributed merge on loopback: 3 ranks × 2 inputs (fp32, 240 MB each), simple_average\n")
    print("| | wall s (median of %d) | bytes moved | peak RSS MiB |" % a.runs)
    print("|---|---:|---:|---|")
    print("| 3 ranks × 2 inputs, --distributed (127.0.0.1) | %.2f | %.0f MB sums (%.0f MB on lo) | %s |" % (
        med(d[0] for d in dist), payload / 1e6, med(d[1] for d in dist) / 1e6,
        " / ".join("rank %d: %.0f" % (r, med(d[2][r] for d in dist)) for r in range(3))))
    print("| single host, the 6 files | %.2f | 0 | %.0f |" % (med(s[0] for s in single), med(s[1] for s in single)))
    print("\noutputs byte-identical: %s" % ("yes" if identical else "NO"))


if __name__ == "__main__":
    main()
