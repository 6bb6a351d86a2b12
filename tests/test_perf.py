"""The measuring helpers behind `ssm-kernels bench` and `ssm-kernels profile`
(python/ssm_kernels/perf): incremental JSON/CSV output, the L2 rotation count, the median timing
helper, the CUDA check shapes, the profile table."""
import json
import time

import pytest
import torch

from ssm_kernels.cli import main
from ssm_kernels.perf import REGISTRY
from ssm_kernels.perf.runner import (Reporter, Roofline, check_shapes, copy_inputs, rotation_copies, tensor_bytes,
                                     time_fn)

ROOF = Roofline(copy_bytes_per_s=10e9, matmul_flops_per_s=1e12)
MB = 1 << 20


def test_reporter_rewrites_valid_json_and_csv_after_every_row(tmp_path, capsys):
    js, cs = tmp_path / "rows.json", tmp_path / "rows.csv"
    rep = Reporter("cpu", json_path=str(js), csv_path=str(cs))
    rep.start(ROOF)
    doc = json.loads(js.read_text())
    assert doc["rows"] == [] and doc["complete"] is False and doc["roofline"]["copy_gbps"] == pytest.approx(10.0)
    rows = [{"op": "x", "pass": "fwd", "shape": f"n={i}", "impl": "torch", "status": "ok", "ms": 1.0 + i}
            for i in range(3)]
    for i, row in enumerate(rows):
        rep.add(row)
        doc = json.loads(js.read_text())  # valid JSON holding every row so far
        assert [r["shape"] for r in doc["rows"]] == [r["shape"] for r in rows[: i + 1]]
        assert len(cs.read_text().splitlines()) == i + 2  # header + rows so far
        # each row is printed as soon as it is added
        assert f"n={i}" in capsys.readouterr().out
    assert json.loads(js.read_text())["complete"] is False
    rep.finish()
    assert json.loads(js.read_text())["complete"] is True
    assert not list(tmp_path.glob("*.tmp"))


def test_bench_subset_writes_json_row_by_row(tmp_path, capsys, monkeypatch):
    # A cut-short run keeps what was measured: record the JSON each time a row is written.
    import ssm_kernels.perf.runner as runner

    js = tmp_path / "rows.json"
    seen = []
    real_write = runner.write_json

    def spy(rows, roof, device, path, complete=True):
        real_write(rows, roof, device, path, complete)
        seen.append(json.loads(open(path).read()))

    monkeypatch.setattr(runner, "write_json", spy)
    code = main(["bench", "causal_conv1d", "--device", "cpu", "--shape", "batch=1,dim=8,seqlen=64,width=4",
                 "--budget", "0.01", "--quiet", "--json", str(js)])
    assert code == 0
    counts = [len(d["rows"]) for d in seen]
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] >= 4
    assert len(set(counts)) == len(counts) - 1  # one rewrite per row (plus the final one)
    assert [d["complete"] for d in seen] == [False] * (len(seen) - 1) + [True]
    final = json.loads(js.read_text())
    assert final["complete"] and len(final["rows"]) == counts[-1]
    ours = [r for r in final["rows"] if r["impl"] == "ssm_kernels"]
    assert ours and all(r["status"] == "ok" and r["copy_pct"] > 0 and r["reps"] >= 1 for r in ours)
    # rows are printed (stdout) as they come, after the header
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("device: cpu") and sum("causal_conv1d" in line for line in out) == counts[-1]


@pytest.mark.parametrize("backward", [True, False], ids=["fwd_bwd", "fwd"])
def test_profile_prints_where_the_time_goes(capsys, backward):
    argv = ["profile", "mamba3", "--device", "cpu", "--shape", "seqlen=70,nheads=2", "--rows", "30"]
    assert main(argv + ([] if backward else ["--no-backward"])) == 0
    out = capsys.readouterr().out
    assert out.startswith("== mamba3 forward+backward" if backward else "== mamba3 forward on cpu")
    assert "'seqlen': 70" in out and "Self CPU time total" in out
    assert "ssm_kernels::mamba3_scan_fwd" in out
    assert ("ssm_kernels::mamba3_scan_bwd" in out) == backward


def test_profile_rejects_unknown_ops(capsys):
    assert main(["profile", "no_such_op", "--device", "cpu"]) == 2
    assert "unknown op" in capsys.readouterr().err


def test_time_limit_skips_the_remaining_cases(tmp_path):
    js = tmp_path / "rows.json"
    code = main(["bench", "causal_conv1d", "linear_scan", "--device", "cpu", "--time-limit", "0", "--quiet",
                 "--json", str(js), "--shape", "batch=1,dim=4,seqlen=32,width=4"])
    assert code == 0
    rows = json.loads(js.read_text())["rows"]
    assert [r["status"] for r in rows] == ["skipped: time limit"] * 2


@pytest.mark.parametrize("per_copy,l2,expected", [
    (30 * MB, 60 * MB, 5),    # 5 * 30 MB = 150 MB > 120 MB; 4 * 30 = 120 is not more
    (40 * MB, 50 * MB, 3),    # 120 MB > 100 MB
    (7 * MB, 60 * MB, 18),    # 18 * 7 = 126 MB > 120 MB >= 17 * 7 = 119 MB
    (200 * MB, 60 * MB, 1),   # one copy is already larger than twice the L2
    (1, 60 * MB, 64),         # tiny inputs: capped
    (0, 60 * MB, 1),
])
def test_rotation_copies_exceed_twice_the_l2(per_copy, l2, expected):
    k = rotation_copies(per_copy, l2)
    assert k == expected
    if 1 < k < 64:
        assert k * per_copy > 2 * l2 >= (k - 1) * per_copy


def test_rotation_copies_respect_the_memory_budget():
    assert rotation_copies(10 * MB, 60 * MB, max_total_bytes=50 * MB) == 5
    assert rotation_copies(10 * MB, 60 * MB, max_total_bytes=5 * MB) == 1
    assert rotation_copies(10 * MB, 60 * MB, max_copies=4) == 4


def test_tensor_bytes_and_copies():
    x = torch.zeros(1000)
    inputs = {"a": x, "b": x[10:], "c": torch.zeros(10, dtype=torch.float64), "flag": True}
    assert tensor_bytes(inputs) == 4000 + 80  # a and b share a storage
    c = copy_inputs(inputs)
    assert c["flag"] is True and torch.equal(c["a"], x)
    assert c["a"].data_ptr() != x.data_ptr()


def test_time_fn_is_the_median_and_cycles_the_copies():
    # One call in five is slow: the median ignores it; the mean would not.
    calls = []

    def make(i):
        def fn():
            calls.append(i)
            time.sleep(0.05 if len(calls) % 5 == 0 else 0.002)
        return fn

    stats = {}
    t = time_fn([make(0), make(1), make(2)], torch.device("cpu"), budget_s=0.03, min_reps=10, max_reps=10,
                cap_s=10.0, stats=stats)
    assert 0.0015 < t < 0.02
    assert stats["reps"] == 10 and stats["copies"] == 3 and stats["max_s"] >= 0.04
    assert set(calls) == {0, 1, 2} and calls[2:] == [i % 3 for i in range(10)]


def test_time_fn_bounds_the_time_of_a_slow_case():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.05)

    stats = {}
    time_fn(slow, torch.device("cpu"), budget_s=0.02, min_reps=5, stats=stats)
    # cap 4 * budget = 0.08 s: one timed repetition (plus the warm-up and the first probe)
    assert stats["reps"] == 1 and len(calls) == 3


def test_check_shapes_cpu_full_cuda_cut():
    op = REGISTRY["fftconv"]
    shape = op.shapes["cuda"][-1]
    fwd, grad = check_shapes(op, shape, torch.device("cpu"), backward=True)
    assert fwd == shape  # CPU: the forward is checked at the benchmarked shape
    fwd, grad = check_shapes(op, shape, torch.device("cuda"), backward=True)
    assert fwd["seqlen"] == shape["seqlen"] and fwd["gated"] == shape["gated"] and fwd["dim"] < shape["dim"]
    assert grad == op.reference_shape(fwd)
    assert check_shapes(op, shape, torch.device("cuda"), backward=False)[1] is None


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_cuda_check_shapes_are_small(name):
    # The float64 references at the CUDA profile's shapes took most of a GPU lease: the cut
    # shapes keep every forward check small, with the same options.
    op = REGISTRY[name]
    for shape in op.shapes["cuda"]:
        fwd, _ = check_shapes(op, shape, torch.device("cuda"), backward=True)
        assert set(fwd) == set(shape)
        full = tensor_bytes(op.make_inputs(shape, torch.device("meta"), op.dtypes["cuda"]))
        cut = tensor_bytes(op.make_inputs(fwd, torch.device("meta"), op.dtypes["cuda"]))
        assert cut <= 64 * 2 ** 20 and (cut < full or full <= 64 * 2 ** 20), (name, fwd, cut, full)


def test_build_peers_prunes_instantiations_to_what_the_bench_calls():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "build_peers.py"
    spec = importlib.util.spec_from_file_location("build_peers", path)
    bp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bp)
    src = "\n".join([
        '#include "k.cuh"',
        "template void causal_conv1d_fwd_cuda<float, float>(ConvParamsBase &params, cudaStream_t stream);",
        "template void causal_conv1d_fwd_cuda<at::BFloat16, at::BFloat16>(ConvParamsBase &params, cudaStream_t stream);",
        "template void causal_conv1d_channellast_fwd_cuda<at::BFloat16, at::BFloat16>(ConvParamsBase &params, cudaStream_t stream);",
    ])
    text, kept, stubbed = bp.prune_source(src, bp.PEERS["causal_conv1d_cuda"][2])
    assert (kept, stubbed) == (1, 2)
    lines = text.splitlines()
    assert lines[0] == "#include <c10/util/Exception.h>" and lines[1] == '#include "k.cuh"'
    assert lines[3] == "template void causal_conv1d_fwd_cuda<at::BFloat16, at::BFloat16>(ConvParamsBase &params, cudaStream_t stream);"
    assert lines[2].startswith("template<> void causal_conv1d_fwd_cuda<float, float>(ConvParamsBase &params, cudaStream_t stream) {")
    assert "TORCH_CHECK(false" in lines[4] and "channellast" in lines[4]
    assert bp.prune_source("int x;\n", [])[1:] == (0, 0)
