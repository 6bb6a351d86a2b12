import json
import subprocess
import sys

import torch

from ssm_kernels.perf import REGISTRY, BenchOp
from ssm_kernels.perf.runner import run_benchmarks
from ssm_kernels.cli import main


def test_info_runs():
    out = subprocess.run([sys.executable, "-m", "ssm_kernels", "info"], capture_output=True, text=True, check=True)
    assert "CUDA kernels built" in out.stdout and "backends available: cpu" in out.stdout


def test_bench_prints_rows_and_writes_json_csv(tmp_path, capsys):
    js, cs = tmp_path / "rows.json", tmp_path / "rows.csv"
    code = main(["bench", "causal_conv1d", "--device", "cpu", "--shape", "batch=1,dim=8,seqlen=64,width=4",
                 "--budget", "0.02", "--quiet", "--json", str(js), "--csv", str(cs)])
    assert code == 0
    table = capsys.readouterr().out
    assert "roofline measured now" in table and "ssm_kernels" in table and "fwd+bwd" in table
    doc = json.loads(js.read_text())
    impls = {(r["pass"], r["impl"]) for r in doc["rows"]}
    assert {("fwd", "ssm_kernels"), ("fwd", "torch"), ("fwd+bwd", "ssm_kernels"), ("fwd+bwd", "torch")} <= impls
    ours = [r for r in doc["rows"] if r["impl"] == "ssm_kernels"]
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["speedup_vs_torch"] > 0 for r in ours)
    assert cs.read_text().splitlines()[0].startswith("op,pass,shape")


def test_bench_unknown_op_is_an_error(capsys):
    assert main(["bench", "no_such_op"]) == 2
    assert "unknown op" in capsys.readouterr().err


def test_bench_refuses_to_time_a_wrong_op():
    good = REGISTRY["causal_conv1d"]
    broken = BenchOp(
        name="_broken_conv",
        shapes=good.shapes,
        make_inputs=good.make_inputs,
        ours=lambda inp: good.ours(inp) * 1.01,
        reference=good.reference,
        baselines=good.baselines,
        flops=good.flops,
        bytes=good.bytes,
        grad_inputs=good.grad_inputs,
    )
    REGISTRY[broken.name] = broken
    try:
        rows, _ = run_benchmarks([broken.name], torch.device("cpu"),
                                 shapes=[{"batch": 1, "dim": 4, "seqlen": 32, "width": 4}], budget_s=0.01,
                                 progress=False)
    finally:
        del REGISTRY[broken.name]
    assert len(rows) == 1 and rows[0]["status"].startswith("FAILED") and "ms" not in rows[0]


def test_peer_skips_a_package_init_that_needs_an_unbuilt_extension(tmp_path, monkeypatch):
    # The shape of mamba_ssm from a source checkout: the package __init__ imports a CUDA
    # extension that was never built; the Triton submodules import each other by full name.
    import sys

    from ssm_kernels.perf.registry import peer

    pkg = tmp_path / "ssmk_fake_peer"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import ssmk_fake_peer_cuda_extension\n")
    (pkg / "ops" / "__init__.py").write_text("raise ImportError('needs the extension too')\n")
    (pkg / "ops" / "helper.py").write_text("SCALE = 3\n")
    (pkg / "ops" / "kernels.py").write_text("from ssmk_fake_peer.ops.helper import SCALE\nVALUE = 7 * SCALE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        mod = peer("ssmk_fake_peer.ops.kernels")
        assert mod is not None and mod.VALUE == 21
    finally:
        for name in [n for n in sys.modules if n.startswith("ssmk_fake_peer")]:
            del sys.modules[name]
    assert peer("ssmk_fake_peer.ops.missing") is None
    assert not [n for n in sys.modules if n.startswith("ssmk_fake_peer")]
    assert peer("ssmk_no_such_package.ops") is None
