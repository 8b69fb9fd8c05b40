"""torchmerge benchmark: prints, side by side, the I/O floor, torchmerge (to .pt and to
.safetensors) and the FusionBench-style Python baseline on the same synthetic checkpoints; and
(--only methods) every merge method of issue 13 beside weighted_average and beside a Python torch
implementation of the same method (bench/methods_python.py).

Medians over --runs alternating runs, page cache warm. Wall time, CPU time (user+sys) and peak
RSS of each command come from wait4()'s rusage. Outputs are hashed on every run to show that
speed never costs correctness (identical bytes across runs).

usage: /usr/bin/python3 bench/bench.py [--n 2 4 8] [--runs 3] [--work /tmp/torchmerge-bench]
                                      [--only n scaling torchscript many-tensors methods] [--before OLD_BIN]
                                      [--python-runs 1] [--python-all]
"""
import argparse
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BASELINE = os.path.join(ROOT, "..", "shared", "baselines", "fusionbench_simple_average.py")
PY = "/usr/bin/python3"


def run(cmd):
    """Runs cmd under /usr/bin/time; returns (wall s, cpu s, peak RSS MiB) of cmd itself (a
    fork of this Python would otherwise count its own pages in the child's peak)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        p = subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", "-o", t.name] + cmd,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if p.returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr.decode()}")
        wall, user, sys_, rss = t.read().split()[-4:]
    return float(wall), float(user) + float(sys_), int(rss) / 1024


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def make_inputs(work, n, dtype, layers, torchscript=False):
    d = os.path.join(work, f"{dtype}-L{layers}{'-ts' if torchscript else ''}")
    cmd = [PY, os.path.join(HERE, "make_synthetic.py"), d, str(n), "--dtype", dtype, "--layers", str(layers)]
    if torchscript:
        cmd.append("--torchscript")
    subprocess.run(cmd, check=True)
    return [os.path.join(d, f"model_{i}.pt") for i in range(n)]


def case(name, commands, runs, outputs):
    """commands: {label: argv or callable}; alternates them run by run; returns medians."""
    samples = {k: [] for k in commands}
    hashes = {k: set() for k in commands}
    for _ in range(runs):
        for label, cmd in commands.items():
            samples[label].append(run(cmd) if not callable(cmd) else cmd())
            out = outputs.get(label)
            if out:
                hashes[label].add(digest(out) if os.path.isfile(out) else "dir")
    med = {k: tuple(statistics.median(s[i] for s in v) for i in range(3)) for k, v in samples.items()}
    return med, hashes


def floor_cmd(inputs, out, sync=False):
    tail = f" && sync {out}" if sync else ""
    return lambda: run(["sh", "-c", f"cat {' '.join(inputs)} > /dev/null && cp {inputs[0]} {out}{tail}"])


LARGEST_TENSOR_MIB = {"float32": 6.0, "bfloat16": 3.0}  # the 1024x1536 weights


def rss_budget(n, dtype):
    """The issue's target: 64 MiB + (n + 1) x the largest tensor."""
    return 64 + (n + 1) * LARGEST_TENSOR_MIB[dtype]


def table(title, med, hashes, floor="I/O floor (cat + cp)", base="baseline (FusionBench-style Python)"):
    print(f"\n## {title}\n")
    print(f"| {'what':<40} | wall s | cpu s | peak RSS MiB | × floor | baseline ÷ this | identical runs |")
    print(f"|{'-' * 42}|-------:|------:|-------------:|--------:|----------------:|:--------------:|")
    for label, (wall, cpu, rss) in med.items():
        xf = wall / med[floor][0] if floor in med else float("nan")
        xb = med[base][0] / wall if base in med else float("nan")
        same = "yes" if len(hashes.get(label, ())) == 1 and "dir" not in hashes[label] else "-"
        print(f"| {label:<40} | {wall:6.2f} | {cpu:5.2f} | {rss:12.0f} | {xf:7.2f} | {xb:15.1f} | {same:^14} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default="/tmp/torchmerge-bench")
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "torchmerge"))
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--python-runs", type=int, default=1,
                    help="methods table: runs of each Python torch implementation (tens of seconds each on "
                         "4 x 240 MB; default 1; 0 skips them)")
    ap.add_argument("--python-all", action="store_true",
                    help="methods table: time the Python implementation of methods torchmerge has not built too")
    ap.add_argument("--before", metavar="BIN",
                    help="another torchmerge binary (e.g. the previous release's) run alternately with --bin in "
                         "the n table, for before/after figures from one run")
    ap.add_argument("--only", nargs="+", choices=["n", "scaling", "torchscript", "many-tensors", "methods"],
                    default=["n", "scaling", "torchscript", "many-tensors", "methods"],
                    help="which tables to print (default: all)")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    out = os.path.join(a.work, "out")
    os.makedirs(out, exist_ok=True)
    tm = a.bin
    print(f"# torchmerge benchmark ({os.uname().nodename}, {os.cpu_count()} cores), median of {a.runs} alternating runs")

    for dtype in ("float32", "bfloat16") if "n" in a.only else ():
        for n in a.n:
            inputs = make_inputs(a.work, n, dtype, 24)
            for p in inputs:  # warm the page cache
                with open(p, "rb") as f:
                    while f.read(1 << 24):
                        pass
            cmds = {
                "I/O floor (cat + cp)": floor_cmd(inputs, os.path.join(out, "floor.pt")),
                "I/O floor + fsync (cat + cp + sync)": floor_cmd(inputs, os.path.join(out, "floor.pt"), sync=True),
                "torchmerge -> .pt": [tm, "simple_average", "-q", "-o", os.path.join(out, "tm.pt")] + inputs,
                "torchmerge -> .safetensors": [tm, "simple_average", "-q", "-o",
                                               os.path.join(out, "tm.safetensors")] + inputs,
            }
            if a.before:
                cmds["before: torchmerge -> .pt"] = [a.before, "simple_average", "-q", "-o",
                                                     os.path.join(out, "before.pt")] + inputs
                cmds["before: torchmerge -> .safetensors"] = [a.before, "simple_average", "-q", "-o",
                                                              os.path.join(out, "before.safetensors")] + inputs
            if not a.skip_baseline and os.path.exists(BASELINE):
                cmds["baseline (FusionBench-style Python)"] = [PY, BASELINE, os.path.join(out, "base.pt")] + inputs
            outs = {"torchmerge -> .pt": os.path.join(out, "tm.pt"),
                    "torchmerge -> .safetensors": os.path.join(out, "tm.safetensors")}
            med, hashes = case(f"{n} x {dtype}", cmds, a.runs, outs)
            size = sum(os.path.getsize(p) for p in inputs) / n / 2**20
            table(f"simple_average, n = {n}, {dtype} inputs ({size:.0f} MiB each); "
                  f"peak RSS target <= {rss_budget(n, dtype):.0f} MiB", med, hashes)

    if "scaling" in a.only:
        scaling(a, tm, out)
    if "torchscript" in a.only:
        torchscript(a, tm, out)
    if "many-tensors" in a.only:
        many_tensors(a, tm, out)
    if "methods" in a.only:
        methods(a, tm, out)


def scaling(a, tm, out):
    """Scaling with model size (n = 4, float32)."""
    print("\n## Scaling with model size (n = 4, float32, torchmerge -> .pt)\n")
    print("| layers | MiB per model | floor s | wall s | × floor | peak RSS MiB |")
    print("|-------:|--------------:|--------:|-------:|--------:|-------------:|")
    for layers in (6, 12, 24, 48):
        inputs = make_inputs(a.work, 4, "float32", layers)
        cmds = {"floor": floor_cmd(inputs, os.path.join(out, "floor.pt")),
                "tm": [tm, "simple_average", "-q", "-o", os.path.join(out, "scale.pt")] + inputs}
        med, _ = case("scaling", cmds, a.runs, {})
        print(f"| {layers:6d} | {os.path.getsize(inputs[0]) / 2**20:13.0f} | {med['floor'][0]:7.2f} | "
              f"{med['tm'][0]:6.2f} | {med['tm'][0] / med['floor'][0]:7.2f} | {med['tm'][2]:12.0f} |")
        if layers != 24:
            shutil.rmtree(os.path.dirname(inputs[0]))


def torchscript(a, tm, out):
    """TorchScript modules in, TorchScript module (and state dict) out."""
    inputs = make_inputs(a.work, 4, "float32", 24, torchscript=True)
    cmds = {"I/O floor (cat + cp)": floor_cmd(inputs, os.path.join(out, "floor.pt")),
            "torchmerge TorchScript -> TorchScript": [tm, "simple_average", "-q", "-o",
                                                      os.path.join(out, "tm_ts.pt")] + inputs,
            "torchmerge TorchScript -> .pt": [tm, "simple_average", "-q", "--format", "pt", "-o",
                                              os.path.join(out, "tm_ts_sd.pt")] + inputs}
    med, hashes = case("ts", cmds, a.runs, {"torchmerge TorchScript -> TorchScript": os.path.join(out, "tm_ts.pt"),
                                            "torchmerge TorchScript -> .pt": os.path.join(out, "tm_ts_sd.pt")})
    model_mib = os.path.getsize(inputs[0]) / 2**20
    table(f"simple_average of 4 TorchScript modules (float32, {model_mib:.0f} MiB each); peak RSS target <= "
          f"{model_mib + rss_budget(4, 'float32'):.0f} MiB (one model + the streaming budget)", med, hashes)


# The methods of issue 13 with the arguments they are timed with, in one table: bench/methods_python.py
# takes torchmerge's command line, so both run the same argv. inputs: how many inputs beside the
# base (slerp: 1); target: the ceiling for seconds ÷ weighted_average's (dare_ties,
# breadcrumbs_ties and della_linear: their family's). Methods still being written are here too:
# a row says "not built" until the built torchmerge knows the method and every flag of its row.
METHODS = {
    "task_arithmetic": dict(method="task_arithmetic", args=["--lambda", "0.3"], target=1.5),
    "ties": dict(method="ties", args=["--density", "0.2", "--trim-scope", "tensor"], target=3),
    "ties (global)": dict(method="ties", args=["--density", "0.2", "--trim-scope", "global"], target=5),
    "dare_linear (l1)": dict(method="dare_linear", args=["--density", "0.5", "--rescale", "l1"], target=1.5),
    "dare_linear (none)": dict(method="dare_linear", args=["--density", "0.5", "--rescale", "none"], target=1.5),
    "dare_ties": dict(method="dare_ties", args=["--density", "0.5"], target=3),
    "breadcrumbs": dict(method="breadcrumbs", args=["--density", "0.9", "--gamma", "0.01"], target=3),
    "breadcrumbs_ties": dict(method="breadcrumbs_ties", args=["--density", "0.9", "--gamma", "0.01"], target=3),
    "della": dict(method="della", args=["--density", "0.5", "--epsilon", "0.1"], target=3),
    "della_linear": dict(method="della_linear", args=["--density", "0.5", "--epsilon", "0.1"], target=3),
    "slerp": dict(method="slerp", args=["--t", "0.5"], inputs=1, target=3),
    "model_stock": dict(method="model_stock", args=[], target=3),
    "model_stock (filter-wise)": dict(method="model_stock", args=["--filter-wise"], target=3),
}
METHODS_PYTHON = os.path.join(HERE, "methods_python.py")
PYTHON_SPEEDUP_TARGET = 5


def method_rss_budget(n):
    """The issue's memory target for methods: 64 MiB + (n + 2) x the largest tensor in float64."""
    return 64 + (n + 2) * 2 * LARGEST_TENSOR_MIB["float32"]


def missing_from(tm, method, args):
    """Why the built torchmerge cannot run `method args` ("" when it can): the method unknown to
    `torchmerge METHOD --help`, or a flag of args absent from its help."""
    p = subprocess.run([tm, method, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        return "not built"
    for flag in (x for x in args if x.startswith("--")):
        if not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(flag), p.stdout):
            return f"not built (no {flag})"
    return ""


def try_run(cmd):
    """run(cmd), or the first line of its error when it fails (one row fails, not the table)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        p = subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", "-o", t.name] + cmd,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            lines = [x for x in p.stderr.splitlines() if x.strip() and not x.startswith("Command exited")]
            return "failed: " + (lines[-1] if lines else f"exit {p.returncode}").replace("|", "/")  # a table cell
        wall, user, sys_, rss = t.read().split()[-4:]
    return float(wall), float(user) + float(sys_), int(rss) / 1024


def timed(commands, runs, output):
    """commands: {label: argv}, alternated run by run, all writing output; returns {label: medians
    (wall, cpu, RSS) or an error string} and {label: set of output digests}."""
    samples, hashes, failed = {k: [] for k in commands}, {k: set() for k in commands}, {}
    for _ in range(runs):
        for label, cmd in commands.items():
            if label in failed:
                continue
            r = try_run(cmd)
            if isinstance(r, str):
                failed[label] = r
                continue
            samples[label].append(r)
            hashes[label].add(digest(output))
    med = {k: failed.get(k) or tuple(statistics.median(s[i] for s in v) for i in range(3))
           for k, v in samples.items() if v or k in failed}
    return med, hashes


def methods(a, tm, out):
    """Each method of issue 13 on 4 x 240 MiB fp32 inputs + a base (slerp: 1 input), beside
    weighted_average of the 4 inputs (no base; the ratios' reference) and simple_average of the
    base and one input (slerp's read volume); and each one's Python torch implementation
    (bench/methods_python.py) on the same files: seconds, peak RSS, speedup."""
    inputs = make_inputs(a.work, 5, "float32", 24)
    for p in inputs:  # warm the page cache
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    base, ins = inputs[0], inputs[1:]
    tm_out, py_out = os.path.join(out, "m_tm.pt"), os.path.join(out, "m_py.pt")
    ref, ref2 = "weighted_average (4 inputs, no base)", "simple_average (base + 1 input)"
    cmds = {ref: [tm, "weighted_average", "-q", "--weights", "1,1,1,1", "-o", tm_out] + ins,
            ref2: [tm, "simple_average", "-q", "-o", tm_out, base, ins[0]]}
    py_cmds, why = {}, {}
    for label, m in METHODS.items():
        tail = m["args"] + ["--base", base, "-o"]
        files = ins[:m.get("inputs", 4)]
        why[label] = missing_from(tm, m["method"], m["args"])
        if not why[label]:
            cmds[label] = [tm, m["method"], "-q"] + tail + [tm_out] + files
        if a.python_runs > 0 and (not why[label] or a.python_all):
            py_cmds[label] = [PY, METHODS_PYTHON, m["method"], "-q"] + tail + [py_out] + files
    med, hashes = timed(cmds, a.runs, tm_out)
    py_med, _ = timed(py_cmds, a.python_runs, py_out) if py_cmds else ({}, {})
    for f in (tm_out, py_out):
        if os.path.exists(f):
            os.remove(f)

    ref_wall = med[ref][0] if isinstance(med.get(ref), tuple) else float("nan")
    mib = os.path.getsize(ins[0]) / 2**20
    print(f"\n## Merge methods, 4 x {mib:.0f} MiB float32 + base (slerp: base + 1 input)\n")
    py_runs = f"median of {a.python_runs} run(s)" if a.python_runs > 0 else "not run (--python-runs 0)"
    print(f"torchmerge: median of {a.runs} runs; Python torch implementation (bench/methods_python.py, "
          f"float32 in memory as mergekit / FusionBench): {py_runs}. Targets: seconds "
          f"÷ weighted_average's as issue 13; peak RSS <= 64 MiB + (n + 2) x the largest tensor in float64 "
          f"({method_rss_budget(4):.0f} MiB for n = 4, {method_rss_budget(1):.0f} for slerp); "
          f">= {PYTHON_SPEEDUP_TARGET}x faster than Python.\n")
    print("| method | arguments | s | cpu s | peak RSS MiB | ÷ weighted_average (target) | RSS budget MiB "
          "| identical runs | Python s | Python RSS MiB | Python ÷ torchmerge |")
    print("|:--|:--|--:|--:|--:|--:|--:|:-:|--:|--:|--:|")

    def mark(ok):
        return "✓" if ok else "✗"

    for label in [ref, ref2] + list(METHODS):
        m = METHODS.get(label, {})
        r, py = med.get(label), py_med.get(label)
        cells = [label, " ".join(m.get("args", []))] + [""] * 9
        if isinstance(py, tuple):
            cells[8:10] = [f"{py[0]:.2f}", f"{py[2]:.0f}"]
        elif py:
            cells[8] = py
        if not isinstance(r, tuple):
            cells[2] = why.get(label) or r or "-"
        else:
            wall, cpu, rss = r
            ratio = wall / ref_wall
            cells[2:6] = [f"{wall:.2f}", f"{cpu:.2f}", f"{rss:.0f}", f"{ratio:.2f}"]
            if m:
                cells[5] += f" (≤ {m['target']} {mark(ratio <= m['target'])})"
                budget = method_rss_budget(m.get("inputs", 4))
                cells[6] = f"{budget:.0f} {mark(rss <= budget)}"
            cells[7] = "yes" if len(hashes[label]) == 1 else f"no ({len(hashes[label])} outputs)"
            if isinstance(py, tuple):
                cells[10] = f"{py[0] / wall:.1f} {mark(py[0] / wall >= PYTHON_SPEEDUP_TARGET)}"
        print("| " + " | ".join(cells) + " |")


MANY_TENSORS = (100_000, 200_000)


def many_tensors(a, tm, out):
    """Per-tensor costs (planning, pickles, headers, tables): 2 inputs of 100,000 and 200,000 small
    tensors, as a mixture-of-experts checkpoint has. Linear time means the 200k merge takes about
    twice the 100k one; the two alternate run by run, so machine noise hits both alike."""
    dirs = {}
    for count in MANY_TENSORS:
        dirs[count] = os.path.join(a.work, f"many-{count}")
        subprocess.run([PY, os.path.join(HERE, "make_many_tensors.py"), dirs[count], "2", str(count)], check=True)
    lo, hi = MANY_TENSORS
    print(f"\n## Many small tensors (2 inputs of 8x8 float32 tensors; targets: {lo // 1000}k <= 10 s, "
          f"{hi // 1000}k <= 2.3 x {lo // 1000}k)\n")
    print(f"| format      | tensors | wall s | cpu s | peak RSS MiB | × the {lo // 1000}k time |")
    print("|:------------|--------:|-------:|------:|-------------:|------------:|")
    for ext in ("pt", "safetensors"):
        cmds = {count: [tm, "simple_average", "-q", "-o", os.path.join(out, f"many.{ext}")] +
                [os.path.join(dirs[count], f"model_{i}.{ext}") for i in range(2)] for count in MANY_TENSORS}
        med, _ = case("many", cmds, a.runs, {})
        for count, (wall, cpu, rss) in med.items():
            print(f"| {ext:<11} | {count:7d} | {wall:6.2f} | {cpu:5.2f} | {rss:12.0f} | "
                  f"{wall / med[lo][0]:11.2f} |")


if __name__ == "__main__":
    main()
