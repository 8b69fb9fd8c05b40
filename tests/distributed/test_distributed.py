"""Merges across hosts (`torchmerge METHOD --distributed`), on loopback: every rank is a CLI
process started and stopped by the test, each with a wall-clock bound (BOUND seconds), on
127.0.0.1 and a free port. Checked against the single-host merge of the same inputs (byte
identity of every tensor) and against an independent float64 reference (within 1 ulp), and the
faults: a rank killed (-9) or stopped (SIGSTOP) mid-merge, a mismatched WORLD_SIZE, a rank whose
tensor shapes differ, a rank that asks for another method, a rank that never joins.

Skipped when the build has no Gloo (TORCHMERGE_WITH_GLOO=0 from tests/CMakeLists.txt)."""
import json
import os
import re
import signal
import struct
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
from reference import assert_close_ulp  # noqa: E402

BIN = os.environ.get("TORCHMERGE_BIN", str(HERE.parents[1] / "build" / "torchmerge"))
BOUND = 120  # seconds: no process of these tests lives longer

pytestmark = pytest.mark.skipif(os.environ.get("TORCHMERGE_WITH_GLOO", "1") == "0",
                                reason="built without Gloo (libgloo-dev missing): no distributed merge")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(rank, world, port, args, inputs, extra_env=None):
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    env.pop("GLOO_SOCKET_IFNAME", None)
    env.update(extra_env or {})
    return subprocess.Popen([BIN] + args + ["-q", "--distributed"] + [str(p) for p in inputs], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs, bound=BOUND):
    """(returncode, stderr, seconds since this call) of each process; kills those over bound."""
    t0 = time.monotonic()
    out = []
    for p in procs:
        left = max(0.1, bound - (time.monotonic() - t0))
        try:
            _, err = p.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            err += "\n[killed by the test after %d s]" % bound
        out.append((p.returncode, err, time.monotonic() - t0))
    return out


def run_ranks(per_rank, method="simple_average", outputs=None, extra=None, world=None, timeout=60, env=None):
    """per_rank[r]: rank r's input list; outputs[r]: its -o; extra[r]: more arguments; env: more
    environment variables for every rank."""
    world = world or len(per_rank)
    port = free_port()
    procs = []
    for r, inputs in enumerate(per_rank):
        args = [method, "-o", str(outputs[r]), "--timeout", str(timeout)] + list((extra or {}).get(r, []))
        procs.append(start(r, world, port, args, inputs, env))
    return finish(procs)


def single(method, inputs, out, extra=()):
    r = subprocess.run([BIN, method, "-q", "-o", str(out)] + list(extra) + [str(p) for p in inputs],
                       capture_output=True, text=True, timeout=BOUND)
    assert r.returncode == 0, r.stderr
    return torch.load(out)


def model(seed, dtype=torch.float32, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"big": (300, 257), "w": (7,), "s": ()}
    sd = {}
    for k, shape in shapes.items():
        sd[k] = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    sd["b16"] = torch.randn((70000,), generator=g, dtype=torch.float64).to(torch.bfloat16)
    sd["steps"] = torch.tensor(seed, dtype=torch.int64)
    return sd


def save_models(tmp, n, **kw):
    paths = []
    for i in range(n):
        p = tmp / ("m%d.pt" % i)
        torch.save(model(i + 1, **kw), p)
        paths.append(p)
    return paths


def load_safetensors(path):
    """{name: tensor} of a safetensors file (read here, independently of torchmerge)."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    dtypes = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I64": torch.int64}
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = bytearray(data[8 + n + begin:8 + n + end])
        out[name] = torch.frombuffer(raw, dtype=dtypes[info["dtype"]]).reshape(info["shape"]).clone()
    return out


def bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32) if t.element_size() == 4 \
        else t.view(torch.int64) if t.is_floating_point() else t


def assert_same_bits(a, b):
    assert list(a.keys()) == list(b.keys())
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(bits(a[k].contiguous()), bits(b[k].contiguous())), "tensor %r differs" % k


def assert_ok(results):
    for r, (rc, err, _) in enumerate(results):
        assert rc == 0, "rank %d: %s" % (r, err)


def assert_all_failed(results, *words):
    for r, (rc, err, _) in enumerate(results):
        assert rc != 0, "rank %d succeeded" % r
        lines = [l for l in err.splitlines() if l.startswith("torchmerge: error: ")]
        assert len(lines) == 1, "rank %d: %r" % (r, err)
        for w in words:
            assert w in lines[0], "rank %d: %r lacks %r" % (r, lines[0], w)


def no_outputs(folder):
    left = [p.name for p in Path(folder).iterdir() if p.name.startswith(("out", ".out"))]
    assert not left, left


# ---- results ---------------------------------------------------------------------------------

def test_simple_average_1_2_0_inputs_equals_single_host(tmp_path):
    a, b, c = save_models(tmp_path, 3)
    outs = [tmp_path / ("out%d.pt" % r) for r in range(3)]
    res = run_ranks([[a], [b, c], []], outputs=outs)
    assert_ok(res)
    assert outs[0].exists() and not outs[1].exists() and not outs[2].exists()
    got = torch.load(outs[0])
    ref = single("simple_average", [a, b, c], tmp_path / "single.pt")
    assert_same_bits(got, ref)
    sds = [torch.load(p) for p in (a, b, c)]
    for k, t in got.items():
        if t.is_floating_point():
            exact = sum(sd[k].to(torch.float64) for sd in sds) / 3
            magnitude = sum(sd[k].to(torch.float64).abs() for sd in sds) / 3  # float64 cancellation slack
            assert_close_ulp(t, exact, t.dtype, magnitude=magnitude, name=k)
        else:
            assert torch.equal(t, sds[0][k])  # non-floating: from the first input (rank 0's)


def test_output_on_all_and_safetensors(tmp_path):
    a, b, c = save_models(tmp_path, 3)
    outs = [tmp_path / ("out%d.safetensors" % r) for r in range(3)]
    res = run_ranks([[a], [b], [c]], outputs=outs, extra={r: ["--output-on", "all"] for r in range(3)})
    assert_ok(res)
    ref = single("simple_average", [a, b, c], tmp_path / "single.pt")
    for r, o in enumerate(outs):
        # non-floating tensors too: from the global first input (rank 0's), as on one host
        assert_same_bits(load_safetensors(o), ref)


def test_gloo_socket_ifname_picks_the_interface(tmp_path):
    """GLOO_SOCKET_IFNAME, read by torchmerge as PyTorch's Python side reads it (the C++ library
    does not): the loopback interface by name gives the same bytes; an interface that does not
    exist fails every rank with a line naming it, and nothing is written."""
    a, b, c = save_models(tmp_path, 3)
    ref = single("simple_average", [a, b, c], tmp_path / "single.pt")
    outs = [tmp_path / ("out%d.pt" % r) for r in range(3)]
    assert_ok(run_ranks([[a], [b], [c]], outputs=outs, env={"GLOO_SOCKET_IFNAME": "lo"}))
    assert_same_bits(torch.load(outs[0]), ref)
    bad = tmp_path / "bad"
    bad.mkdir()
    res = run_ranks([[a], [b], [c]], outputs=[bad / ("out%d.pt" % r) for r in range(3)], timeout=10,
                    env={"GLOO_SOCKET_IFNAME": "nosuchif0"})
    assert_all_failed(res, "nosuchif0", "no network interface")
    no_outputs(bad)


def test_weighted_average_normalises_by_the_global_sum(tmp_path):
    a, b, c = save_models(tmp_path, 3)
    outs = [tmp_path / ("out%d.pt" % r) for r in range(3)]
    res = run_ranks([[a], [b, c], []], method="weighted_average", outputs=outs,
                    extra={0: ["--weights", "1"], 1: ["--weights", "2,-0.5"], 2: []})
    assert_ok(res)
    got = torch.load(outs[0])
    ref = single("weighted_average", [a, b, c], tmp_path / "single.pt", ["--weights", "1,2,-0.5"])
    assert_same_bits(got, ref)
    sds = [torch.load(p) for p in (a, b, c)]
    w = [1.0, 2.0, -0.5]
    for k, t in got.items():
        if t.is_floating_point():
            exact = sum(wi * sd[k].to(torch.float64) for wi, sd in zip(w, sds)) / sum(w)
            magnitude = sum(abs(wi) * sd[k].to(torch.float64).abs() for wi, sd in zip(w, sds)) / sum(w)
            assert_close_ulp(t, exact, t.dtype, magnitude=magnitude, name=k)


# Methods through their own code across hosts: 3 ranks holding 1, 2 and 0 inputs, every rank
# with the base; the output is the single-host merge of the same inputs in rank order. Per-input
# parameters are given per rank (rank 0's value for its input, rank 1's for its two).
METHODS = [
    ("task_arithmetic", ["--lambda", "0.3"], {0: ["--weights", "1"], 1: ["--weights", "2,-0.5"]}),
    ("task_arithmetic", ["--normalize"], {0: ["--weights", "1"], 1: ["--weights", "2,-0.5"]}),
    ("dare_linear", ["--density", "0.6", "--seed", "7", "--normalize"],  # rank 1's weights alone sum to 0
     {0: ["--weights", "1"], 1: ["--weights", "2,-2"]}),
    ("dare_ties", ["--density", "0.5", "--seed", "3", "--lambda", "0.9"], {}),
    ("dare_ties", ["--density", "0.5", "--normalize", "--majority-sign", "count", "--rescale", "inverse"], {}),
    ("ties", ["--density", "0.4"], {0: ["--weights", "0.7"], 1: ["--weights", "1.2,0.9"]}),
    ("ties", ["--density", "0.4", "--merge-func", "max"], {}),
    ("ties", ["--density", "0.5", "--merge-func", "sum"], {}),
    ("breadcrumbs", ["--density", "0.5", "--gamma", "0.05", "--lambda", "0.8"], {}),
    ("breadcrumbs_ties", ["--gamma", "0.05"], {0: ["--density", "0.4"], 1: ["--density", "0.5,0.6"],
                                               2: ["--density", "0.3"]}),
    ("della", ["--density", "0.6", "--epsilon", "0.2", "--seed", "5"], {}),
    ("della_linear", ["--density", "0.6", "--epsilon", "0.2"], {}),
]


def per_rank_params(per_rank, counts):
    """The single host's per-input parameters: each rank's values in rank order."""
    merged = {}
    for r, args in sorted(per_rank.items()):
        for flag, value in zip(args[::2], args[1::2]):
            vals = value.split(",")
            merged.setdefault(flag, {})[r] = vals if len(vals) == counts[r] else vals * counts[r]
    return [x for flag, by in merged.items()
            for x in (flag, ",".join(v for r in sorted(by) for v in by[r]))]


def run_method(tmp_path, method, common, per_rank, dtype):
    """(rank 0's output, the single-host output, the base) of 3 ranks holding 1, 2 and 0 inputs."""
    base, a, b, c = save_models(tmp_path, 4, dtype=dtype)
    outs = [tmp_path / ("out%d.pt" % r) for r in range(3)]
    res = run_ranks([[a], [b, c], []], method=method, outputs=outs,
                    extra={r: common + ["--base", str(base)] + per_rank.get(r, []) for r in range(3)})
    assert_ok(res)
    extra = common + ["--base", str(base)] + per_rank_params({r: v for r, v in per_rank.items() if v}, [1, 2, 0])
    return torch.load(outs[0]), single(method, [a, b, c], tmp_path / "single.pt", extra), torch.load(base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method,common,per_rank", METHODS, ids=["%s-%d" % (m[0], i) for i, m in enumerate(METHODS)])
def test_method_1_2_0_inputs_equals_single_host(tmp_path, method, common, per_rank, dtype):
    got, ref, base = run_method(tmp_path, method, list(common), per_rank, dtype)
    assert_same_bits(got, ref)
    assert torch.equal(got["steps"], base["steps"])  # non-floating tensors from the base, as on one host


def model_stock_f64(thetas, base, filter_wise):
    """model_stock in float64 (mergekit's mean pairwise cosine), rows along the last dimension."""
    b = base.to(torch.float64)
    rows = b.reshape(-1, b.shape[-1]) if filter_wise and b.dim() >= 2 else b.reshape(1, -1)
    ds = [t.to(torch.float64).reshape(rows.shape) - rows for t in thetas]
    n = len(ds)
    cos = sum(((ds[i] * ds[j]).sum(-1) / (ds[i].norm(dim=-1) * ds[j].norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
              for i in range(n) for j in range(i + 1, n)) / (n * (n - 1) / 2)
    t = (n * cos / (1 + (n - 1) * cos)).unsqueeze(-1)
    mean = sum(x.to(torch.float64).reshape(rows.shape) for x in thetas) / n
    # t carries the float64 rounding of the row's dot products (relative ~√len·ε), scaled by |mean − b|
    slack = 16 * (mean.abs() + rows.abs()) + rows.shape[-1] ** 0.5 * (mean - rows).abs()
    return (t * mean + (1 - t) * rows).reshape(b.shape), slack.reshape(b.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("filter_wise", [False, True], ids=["tensor", "rows"])
def test_model_stock_close_to_single_host(tmp_path, filter_wise, dtype):
    # cos θ from ‖Σ uᵢ‖² − Σ ‖uᵢ‖² instead of the mean of the pairwise cosines: both are the
    # exact value to float64 rounding (docs/distributed.md), so each output is within 1 ulp of the
    # float64 reference, give or take that rounding (where the result cancels to near 0, it can be
    # several of its own ulps: seen on 2M-element tensors, single host and distributed alike)
    common = ["--filter-wise"] if filter_wise else []
    got, ref, base = run_method(tmp_path, "model_stock", common, {}, dtype)
    thetas = [torch.load(tmp_path / ("m%d.pt" % i)) for i in (1, 2, 3)]
    assert list(got) == list(ref)
    for k in got:
        if got[k].is_floating_point():
            exact, magnitude = model_stock_f64([sd[k] for sd in thetas], base[k], filter_wise)
            assert_close_ulp(ref[k], exact, ref[k].dtype, magnitude=magnitude, name=k)
            assert_close_ulp(got[k], exact, got[k].dtype, magnitude=magnitude, name=k)
        else:
            assert torch.equal(got[k], ref[k])


def test_method_output_on_all_with_a_rank_without_inputs(tmp_path):
    base, a, b, c = save_models(tmp_path, 4)
    outs = [tmp_path / ("out%d.safetensors" % r) for r in range(3)]
    args = ["--density", "0.5", "--base", str(base), "--output-on", "all"]
    assert_ok(run_ranks([[a], [b, c], []], method="dare_ties", outputs=outs, extra={r: args for r in range(3)}))
    ref = single("dare_ties", [a, b, c], tmp_path / "single.pt", args[:4])
    for o in outs:  # the rank without inputs writes too: its plan and non-floating tensors from the base
        assert_same_bits(load_safetensors(o), ref)


def test_task_arithmetic_within_1_ulp_of_the_exact_value(tmp_path):
    got, _, bsd = run_method(tmp_path, "task_arithmetic", ["--lambda", "0.3"], {}, torch.float32)
    sds = [torch.load(tmp_path / ("m%d.pt" % i)) for i in (1, 2, 3)]
    for k, t in got.items():
        if t.is_floating_point():
            b = bsd[k].to(torch.float64)
            exact = b + 0.3 * sum(sd[k].to(torch.float64) - b for sd in sds)
            magnitude = 2 * b.abs() + 0.3 * sum(sd[k].to(torch.float64).abs() for sd in sds)
            assert_close_ulp(t, exact, t.dtype, magnitude=magnitude, name=k)


# ---- refusals and agreement ---------------------------------------------------------------

@pytest.mark.parametrize("method,args,words", [
    ("slerp", ["--t", "0.5"], ["slerp cannot be merged across hosts", "ties", "model_stock"]),
    ("ties", ["--density", "0.5", "--trim-scope", "global"], ["trim_scope: global"]),
    ("model_stock", ["--pairwise", "angle"], ["pairwise: angle"]),
], ids=["slerp", "ties-global", "model_stock-angle"])
def test_method_that_is_not_a_sum_is_refused(tmp_path, method, args, words):
    base, a, b = save_models(tmp_path, 3)
    args = args + (["--base", str(base)] if method != "slerp" else [])
    res = run_ranks([[a], [b]], method=method, outputs=[tmp_path / "out0.pt", tmp_path / "out1.pt"],
                    extra={0: args, 1: args}, timeout=20)
    assert_all_failed(res, *words)
    no_outputs(tmp_path)


def test_model_stock_guard_on_tiny_task_vectors_is_refused(tmp_path):
    # one host's cosine divides by max(‖δᵢ‖‖δⱼ‖, 1e-6): not a sum over ranks where it applies
    base = {"w": torch.ones(7), "v": torch.ones(3)}
    paths = [tmp_path / "base.pt"] + [tmp_path / ("t%d.pt" % i) for i in range(2)]
    torch.save(base, paths[0])
    for i, p in enumerate(paths[1:]):
        g = torch.Generator().manual_seed(i)
        torch.save({"w": base["w"] + torch.randn(7, generator=g),
                    "v": base["v"] + 1e-4 * torch.randn(3, generator=g)}, p)
    args = ["--base", str(paths[0])]
    res = run_ranks([[paths[1]], [paths[2]]], method="model_stock",
                    outputs=[tmp_path / "out0.pt", tmp_path / "out1.pt"], extra={0: args, 1: args}, timeout=20)
    assert_all_failed(res, "tensor 'v'", "< 1e-6", "merge this model on one host")
    no_outputs(tmp_path)


def test_rank_without_base_fails_every_rank(tmp_path):
    base, a, b, c = save_models(tmp_path, 4)
    outs = [tmp_path / ("out%d.pt" % r) for r in range(3)]
    with_base = ["--density", "0.5", "--base", str(base)]
    res = run_ranks([[a], [b, c], []], method="dare_ties", outputs=outs, timeout=20,
                    extra={0: with_base, 1: ["--density", "0.5"], 2: with_base})
    assert_all_failed(res, "rank 1", "needs the base model on every rank")
    no_outputs(tmp_path)


def test_another_base_on_one_rank_fails_every_rank(tmp_path):
    base, a, b, other = save_models(tmp_path, 4)
    outs = [tmp_path / ("out%d.pt" % r) for r in range(2)]
    res = run_ranks([[a], [b]], method="task_arithmetic", outputs=outs, timeout=20,
                    extra={0: ["--base", str(base)], 1: ["--base", str(other)]})
    assert_all_failed(res, "rank 1's base model differs from rank 0's")
    no_outputs(tmp_path)


def test_different_methods_fail_every_rank(tmp_path):
    a, b, c = save_models(tmp_path, 3)
    outs = [tmp_path / ("out%d.pt" % r) for r in range(3)]
    port = free_port()
    procs = [start(0, 3, port, ["simple_average", "-o", str(outs[0]), "--timeout", "30"], [a]),
             start(1, 3, port, ["weighted_average", "--weights", "1", "-o", str(outs[1]), "--timeout", "30"], [b]),
             start(2, 3, port, ["simple_average", "-o", str(outs[2]), "--timeout", "30"], [c])]
    res = finish(procs)
    assert_all_failed(res, "rank 1", "method=")
    no_outputs(tmp_path)


def test_different_shapes_on_one_rank_fail_every_rank(tmp_path):
    a, b = save_models(tmp_path, 2)
    odd = tmp_path / "odd.pt"
    torch.save(model(9, shapes={"big": (300, 257), "w": (8,), "s": ()}), odd)
    outs = [tmp_path / ("out%d.pt" % r) for r in range(3)]
    res = run_ranks([[a], [b], [odd]], outputs=outs, timeout=30)
    assert_all_failed(res, "rank 2", "tensor 'w'", "[8]", "[7]")
    no_outputs(tmp_path)


def test_mismatched_world_size_never_averages_fewer(tmp_path):
    a, b, c = save_models(tmp_path, 3)
    outs = [tmp_path / ("out%d.pt" % r) for r in range(3)]
    port = free_port()
    # rank 0 (WORLD_SIZE 2) first; then a rank that believes in 3 ranks; once it has joined the
    # store (read through torch's own TCPStore client), rank 1: ranks 0 and 1 must not write a
    # 2-model average. (A rank that joins after the others finished cannot be noticed.)
    p0 = start(0, 2, port, ["simple_average", "-o", str(outs[0]), "--timeout", "20"], [a])
    p2 = start(2, 3, port, ["simple_average", "-o", str(outs[2]), "--timeout", "20"], [c])
    from datetime import timedelta
    import torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
    deadline = time.monotonic() + 30
    while store.add("joined", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    p1 = start(1, 2, port, ["simple_average", "-o", str(outs[1]), "--timeout", "20"], [b])
    res = finish([p0, p1, p2])
    for r, (rc, err, _) in enumerate(res):
        assert rc != 0, "rank %d succeeded: %s" % (r, err)
        assert "WORLD_SIZE" in err or "world_size" in err, err
    no_outputs(tmp_path)


def test_rank_that_never_joins_fails_rendezvous_within_twice_the_timeout(tmp_path):
    (a,) = save_models(tmp_path, 1)
    port = free_port()
    t0 = time.monotonic()
    res = finish([start(0, 2, port, ["simple_average", "-o", str(tmp_path / "out.pt"), "--timeout", "5"], [a])])
    assert time.monotonic() - t0 < 10  # 2x the timeout, process start (LibTorch's load) included
    assert_all_failed(res, "rank 1 did not reach")
    no_outputs(tmp_path)


# ---- faults mid-merge ----------------------------------------------------------------------

def big_models(tmp, n):
    """Inputs big enough that the merge takes seconds on loopback (~64 MB each)."""
    paths = []
    for i in range(n):
        p = tmp / ("big%d.pt" % i)
        g = torch.Generator().manual_seed(i)
        torch.save({"l%d" % j: torch.randn((1024, 2048), generator=g) for j in range(8)}, p)
        paths.append(p)
    return paths


def wait_mid_merge(folder, procs, limit=30):
    """Until rank 0 has written 1 MiB of its output: every rank has passed on blocks by then (rank
    0 writes a block once its total came round), so every rank is mid-merge, not setting up."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if any(p.name.startswith(".out") and p.stat().st_size > (1 << 20) for p in Path(folder).iterdir()):
            return
        assert all(p.poll() is None for p in procs), "a rank ended before the merge started"
        time.sleep(0.01)
    raise AssertionError("the merge did not start")


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_rank_dies_or_stalls_mid_merge(tmp_path, fault):
    ins = big_models(tmp_path, 3)
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    port = free_port()
    timeout = 5
    procs = [start(r, 3, port, ["simple_average", "-o", str(out_dir / ("out%d.pt" % r)), "--timeout", str(timeout)],
                   [ins[r]], {"TORCHMERGE_THREADS": "1"}) for r in range(3)]
    try:
        wait_mid_merge(out_dir, procs)
        t0 = time.monotonic()
        os.kill(procs[1].pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        res = finish([procs[0], procs[2]], bound=4 * timeout + 10)
        took = time.monotonic() - t0
    finally:
        procs[1].kill()
        procs[1].communicate()
    for rc, err, _ in res:
        assert rc != 0, err
        line = [l for l in err.splitlines() if l.startswith("torchmerge: error: ")]
        assert len(line) == 1, "rc %d: %s" % (rc, err)
    # a dead rank is noticed at once (its connections close); a stalled one when the exchange
    # waiting on it times out; then 1 s to see whose heartbeat stopped and up to 1 s for rank 0
    # to let the others read the store: both survivors are gone by then
    assert took < (timeout if fault == "kill" else timeout + 4), took
    # rank 1 is named; under load a survivor may already have left after noticing it, and is then
    # named beside it ("rank 1, 2 stopped responding")
    for rc, err, _ in res:
        assert re.search(r"rank (\d+, )*1(, \d+)* stopped responding", err), err
    print("\n%s of rank 1: the others exited after %.2f s (timeout %d s)" % (fault, took, timeout))
    no_outputs(out_dir)


def test_sigpipe_mid_merge_ends_no_rank(tmp_path):
    """Gloo writes to its sockets with writev, which raises SIGPIPE once the peer has gone (the
    write would fail with EPIPE, which Gloo handles): a process that leaves SIGPIPE at its
    default ends without a word, as a survivor once did in CI when another rank was killed. A
    distributed merge blocks SIGPIPE in every thread of its session; a SIGPIPE sent to each rank
    mid-merge (to the process: it reaches a thread that does not block it, if any) then changes
    nothing, and the output is the single-host merge's."""
    ins = big_models(tmp_path, 3)
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    port = free_port()
    procs = [start(r, 3, port, ["simple_average", "-o", str(out_dir / ("out%d.pt" % r)), "--timeout", "30"],
                   [ins[r]], {"TORCHMERGE_THREADS": "1"}) for r in range(3)]
    wait_mid_merge(out_dir, procs)
    for p in procs:
        os.kill(p.pid, signal.SIGPIPE)
    assert_ok(finish(procs))
    assert_same_bits(torch.load(out_dir / "out0.pt"), single("simple_average", ins, tmp_path / "single.pt"))


def test_recipe_distributed_section(tmp_path):
    a, b, c = save_models(tmp_path, 3)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: simple_average\nmodels: [%s]\noutput: %s\n"
                      "distributed: {world_size: 2, master_addr: 127.0.0.1, timeout: 30}\n"
                      % (a, tmp_path / "out.pt"))
    port = free_port()
    procs = []
    for r, models in enumerate(([str(a)], [str(b), str(c)])):
        env = dict(os.environ, MASTER_PORT=str(port))
        env.pop("RANK", None)
        args = [BIN, "run", str(recipe), "-q", "distributed.rank=%d" % r, "models=[%s]" % ", ".join(models)]
        if r:
            args.append("output=%s" % (tmp_path / "out1.pt"))
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    assert_ok(finish(procs))
    assert not (tmp_path / "out1.pt").exists()
    assert_same_bits(torch.load(tmp_path / "out.pt"), single("simple_average", [a, b, c], tmp_path / "single.pt"))
