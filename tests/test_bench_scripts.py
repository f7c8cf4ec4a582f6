"""The benchmark scripts' plumbing on CPU (their timings need a GPU; their code paths must not wait for one):
providers built, outputs checked against the reference, every row and column written. Timing is stubbed
(``do_bench`` calls the function once) and the shapes are tiny; fastvar's providers run the eager backend
(the kernels have their own tests), except in one quantizer test that runs the step on the Triton kernels."""
import csv
import importlib.util
import os

import pytest
import torch

from fastvar.utils import benchmarking

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def load_on_cpu(name, monkeypatch):
    """``bench/<name>.py`` as a module, on CPU: no GPU check, CPU metadata, no plot."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "DEVICE", "cpu")
    monkeypatch.setattr(module, "require_cuda", lambda script: True)
    monkeypatch.setattr(module, "metadata", lambda: benchmarking.metadata(torch.device("cpu")))
    monkeypatch.setattr(module, "plot", lambda path: None)
    return module


@pytest.fixture
def stub_timing(monkeypatch):
    import triton.testing

    def do_bench(fn, warmup=None, rep=None, quantiles=None):
        fn()
        return [1.0, 0.9, 1.1]
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setenv("FASTVAR_BACKEND", "eager")


def test_bench_attention_writes_every_row(stub_timing, monkeypatch, tmp_path):
    bench = load_on_cpu("bench_attention", monkeypatch)
    monkeypatch.setattr(bench, "TRAIN_CASES", {"tiny": ((1, 2, 3), 2, 2, 16)})
    monkeypatch.setattr(bench, "KV_CASES", {"kv-tiny": ((1, 2, 3), 2, 2, 16)})
    out = tmp_path / "attention.csv"
    providers = ["sdpa-dense", "fastvar", "sdpa-precat", "sdpa-cat"]
    assert bench.main(["--cases", "tiny", "kv-tiny", "--providers", *providers, "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    training = [r for r in rows if r["case"] == "tiny"]
    assert {(r["provider"], r["mode"]) for r in training} == {(p, m) for p in ("sdpa-dense", "fastvar")
                                                             for m in ("fwd", "fwd+bwd")}
    assert all(r["speedup_vs_sdpa"] == "1.000" and float(r["rel_err"]) < 0.05 for r in training)
    steps = [r for r in rows if r["case"] == "kv-tiny"]
    assert sorted((r["provider"], int(r["scale"])) for r in steps) == sorted(
        (p, s) for p in ("sdpa-precat", "sdpa-cat", "fastvar") for s in range(3))
    assert all(r["speedup_vs_sdpa"] == "1.000" for r in steps)
    assert all(r["device"].startswith("cpu") and r["commit"] for r in rows)


def test_bench_quantizer_writes_every_row(stub_timing, monkeypatch, tmp_path):
    bench = load_on_cpu("bench_quantizer", monkeypatch)
    monkeypatch.setattr(bench, "SCHEDULES", {"256": (1, 2, 3)})
    monkeypatch.setattr(bench, "peak_mb", lambda fn: 0.0)
    monkeypatch.setattr(bench, "device_ops_per_call", lambda fn: 6)
    out = tmp_path / "quantizer.csv"
    assert bench.main(["--batches", "1", "2", "--schedules", "256", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert sorted({(r["op"], r["batch"]) for r in rows}) == sorted((op, b) for op in bench.OPS for b in ("1", "2"))
    assert {(r["op"], r["provider"]) for r in rows} == {(op, p) for op in bench.OPS for p in ("eager", "fastvar")} | {
        (op, "fastvar-fused") for op in ("step", "step_idx")}
    for r in rows:
        if r["provider"] != "eager":          # the eager backend here: the same computation, the same bits
            assert r["check"].startswith("disagree=0/") or r["check"].startswith("rel_err=0.00e+00"), r
        assert r["gpu_ops_per_scale"] == ("2.0" if r["op"].startswith("step") else "")


@pytest.mark.interpreter
def test_bench_quantizer_step_on_the_triton_kernels(stub_timing, monkeypatch, tmp_path):
    """The step providers on the Triton kernels (interpreter): ``fastvar`` keeps the eager bits where the
    interpolation's rounding is ATen's, ``fastvar-fused`` (its own conv sums) stays within float32 tolerance."""
    from tolerances import REL
    from tolerances import bit_exact_expected
    monkeypatch.setenv("FASTVAR_BACKEND", "triton")
    bench = load_on_cpu("bench_quantizer", monkeypatch)
    monkeypatch.setattr(bench, "SCHEDULES", {"256": (1, 2, 3)})
    monkeypatch.setattr(bench, "peak_mb", lambda fn: 0.0)
    monkeypatch.setattr(bench, "device_ops_per_call", lambda fn: 6)
    out = tmp_path / "quantizer.csv"
    assert bench.main(["--ops", "step_idx", "--batches", "2", "--schedules", "256", "--out", str(out)]) == 0
    checks = {r["provider"]: r["check"] for r in csv.DictReader(open(out))}
    assert set(checks) == {"eager", "fastvar", "fastvar-fused"}
    if bit_exact_expected():
        assert checks["fastvar"].endswith("bitwise=True"), checks
    for provider in ("fastvar", "fastvar-fused"):
        err = float(checks[provider].split()[0].removeprefix("rel_err="))
        assert err <= REL[torch.float32], checks
