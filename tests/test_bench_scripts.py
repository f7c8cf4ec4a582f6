"""The benchmark scripts' plumbing on CPU (their timings need a GPU; their code paths must not wait for one):
providers built, outputs checked against the reference, every row written in the common layout. Timing is
stubbed (``do_bench`` calls the function once and reports 1 us; peak memory and GPU operations are fixed
numbers) and the shapes are tiny; fastvar's providers run the eager backend (the kernels have their own tests),
except in the tests marked ``interpreter``."""
import csv
import importlib.util
import os

import pytest
import torch

from fastvar.utils import benchmarking
from fastvar.utils.benchmarking import COLUMNS, Case
from tolerances import assert_rel

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def load_on_cpu(name, monkeypatch, folder=BENCH):
    """``bench/<name>.py`` (or ``<folder>/<name>.py``) as a module, on CPU: no GPU check of its own, no plot."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", os.path.join(folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "DEVICE", "cpu", raising=False)
    monkeypatch.setattr(module, "require_cuda", lambda script: True, raising=False)
    monkeypatch.setattr(module, "plot", lambda *a, **k: None, raising=False)
    return module


def read_rows(path, bench):
    """The CSV's rows, after checking the common leading columns and the metadata of every row."""
    with open(path) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames[:len(COLUMNS)]) == COLUMNS
        rows = list(reader)
    assert rows
    for r in rows:
        assert r["device"].startswith("cpu") and r["commit"] and r["date"] and r["torch"] and r["bench"] == bench
    return rows


@pytest.fixture
def stub_timing(monkeypatch):
    import triton.testing

    def do_bench(fn, warmup=None, rep=None, quantiles=None):
        fn()
        return [1e-3, 0.9e-3, 1.1e-3]
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(benchmarking, "peak_mb", lambda fn: 0.0)
    monkeypatch.setattr(benchmarking, "device_ops_per_call", lambda fn: 6)
    monkeypatch.setattr(benchmarking, "require_cuda", lambda script: True)
    monkeypatch.setenv("FASTVAR_BACKEND", "eager")


def test_runner_rows_speedups_and_out_of_memory(stub_timing, monkeypatch, tmp_path):
    """One row per timed provider with the work rates and speedups; an out-of-memory provider or case is skipped
    and the run goes on."""
    import triton.testing
    ms = {"eager": 2.0, "fast": 0.5, "other": 1.0}

    def do_bench(fn, warmup=None, rep=None, quantiles=None):
        name = fn()
        if name == "huge":
            raise torch.cuda.OutOfMemoryError("stub")
        return [ms[name], ms[name] * 0.9, ms[name] * 1.1]
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)

    def build():
        return [Case("a", {p: (lambda p=p: p) for p in ("eager", "huge", "fast", "other")},
                     {"eager": "ref", "fast": "ok"}, "n=4", keys={"n": 4}, nbytes={"fast": 2e6, "eager": 4e6},
                     flops=1e9, also_vs=("fast",), scales=3)]

    def oom():
        raise torch.cuda.OutOfMemoryError("stub")
    args = type("Args", (), dict(warmup=1, rep=1, out=str(tmp_path / "x.csv")))
    path, written = benchmarking.run_cases("unit", [("ok", build), ("oom", oom)], args, str(tmp_path), log=print)
    rows = read_rows(path, "unit")
    assert [{k: str(v) for k, v in r.items()} for r in written] == rows
    by = {r["provider"]: r for r in rows}
    assert list(by) == ["eager", "fast", "other"]
    assert (by["fast"]["ms"], by["fast"]["ms_p20"], by["fast"]["speedup_vs_eager"]) == ("0.5000", "0.4500", "4.000")
    assert by["fast"]["GB/s"] == "4.0" and by["eager"]["GB/s"] == "2.0" and by["other"]["GB/s"] == ""
    assert by["fast"]["TFLOP/s"] == "2.00" and by["fast"]["pct_peak"] == "" and by["fast"]["check"] == "ok"
    assert by["other"]["speedup_vs_fast"] == "0.500" and by["eager"]["speedup_vs_fast"] == ""
    assert all(r["gpu_ops"] == "6" and r["gpu_ops_per_scale"] == "2.0" and r["n"] == "4" for r in rows)


def test_ceiling_fractions():
    meta = dict(benchmarking.metadata(torch.device("cpu")), device="NVIDIA H100 80GB HBM3")
    row = benchmarking.result_row(meta, "unit", "c", "p", "", (1.0, None, None), nbytes=3.35e9, flops=989e9,
                                  peak="bf16_tflops")
    assert (row["GB/s"], row["pct_hbm"], row["TFLOP/s"], row["pct_peak"]) == ("3350.0", "100.0", "989.00", "100.0")


def test_bench_attention(stub_timing, monkeypatch, tmp_path):
    bench = load_on_cpu("bench_attention", monkeypatch)
    monkeypatch.setattr(bench, "TRAIN_CASES", {"tiny": ((1, 2, 3), 2, 2, 16)})
    monkeypatch.setattr(bench, "KV_CASES", {"kv-tiny": ((1, 2, 3), 2, 2, 16)})
    out = tmp_path / "attention.csv"
    providers = ["sdpa-dense", "fastvar", "sdpa-precat", "sdpa-cat"]
    assert bench.main(["--cases", "tiny", "kv-tiny", "--providers", *providers, "--out", str(out)]) == 0
    rows = read_rows(out, "attention")
    training = [r for r in rows if r["case"] == "tiny"]
    assert {(r["provider"], r["mode"]) for r in training} == {(p, m) for p in ("sdpa-dense", "fastvar")
                                                             for m in ("fwd", "fwd+bwd")}
    assert all(r["speedup_vs_eager"] == "1.000" and float(r["check"].removeprefix("rel_err=")) < 0.05
               for r in training)
    steps = [r for r in rows if r["case"] == "kv-tiny"]
    assert sorted((r["provider"], int(r["scale"])) for r in steps) == sorted(
        (p, s) for p in ("sdpa-precat", "sdpa-cat", "fastvar") for s in range(3))
    assert all(r["speedup_vs_eager"] == "1.000" and r["TFLOP/s"] for r in steps)


@pytest.mark.interpreter
def test_bench_attention_tiles(stub_timing, monkeypatch, tmp_path, capsys):
    """``--tiles`` (Triton kernels, interpreter): a row per candidate tile of each kernel, the pinned one first and
    the baseline, each checked against the float32 reference; a candidate that cannot launch, computes a wrong
    output or writes wrong cache rows is left out (and the others still pass), a wrong pinned tile stops the
    run."""
    from fastvar.triton_kernels import attention as A
    bench = load_on_cpu("bench_attention", monkeypatch)
    monkeypatch.setattr(bench, "TRAIN_CASES", {"tiny": ((1, 2, 3), 2, 3, 16)})
    monkeypatch.setattr(bench, "KV_CASES", {"kv-tiny": ((1, 2, 3, 5), 2, 3, 16)})
    out = tmp_path / "attention_tiles.csv"
    argv = ["--tiles", "--dtype", "float32", "--out", str(out)]
    tables = {kind: A._configs(kind, 16, torch.float32, "cuda", 14) for kind in ("fwd", "dkdv", "dq")}
    configs, step = A._configs, A.kv_cached_attention_fwd
    monkeypatch.setattr(A, "_configs", lambda kind, *a: configs(kind, *a) + [(16, 24, 4, 2)])  # 24: not a power of 2
    bad_kv = A._kv_candidates(25, 16, torch.float32)[1]

    def step_writing_a_wrong_cache_row(q, k, v, k_cache, v_cache, cache_len, *a, config=None, **kw):
        result = step(q, k, v, k_cache, v_cache, cache_len, *a, config=config, **kw)
        if config == bad_kv:
            k_cache[:, cache_len] += 1.0
        return result
    monkeypatch.setattr(A, "kv_cached_attention_fwd", step_writing_a_wrong_cache_row)
    assert bench.main(["--cases", "tiny", "kv-tiny", *argv]) == 0
    assert "kv-tiny kv " + bench.tile_label(bad_kv) + ": left out: SystemExit" in capsys.readouterr().out
    rows = read_rows(out, "attention")
    for kind, tiles in tables.items():
        got = [r for r in rows if r["case"] == "tiny" and r["kernel"] == kind]
        assert [r["provider"] for r in got] == list(dict.fromkeys(map(bench.tile_label, tiles))), kind
        assert got[0]["speedup_vs_eager"] == "1.000" and all(r["pinned"] == got[0]["provider"] for r in got)
        assert all(r["mode"] == "tiles" and float(r["check"].removeprefix("rel_err=")) < 1e-5 for r in got), got
    steps = [r for r in rows if r["case"] == "kv-tiny"]
    assert sorted({int(r["scale"]) for r in steps}) == [1, 2, 3]
    for s, l in ((1, 4), (2, 9), (3, 25)):
        want = [bench.tile_label(t) for t in A._kv_candidates(l, 16, torch.float32) if l != 25 or t != bad_kv]
        got = [r for r in steps if int(r["scale"]) == s]
        assert [r["provider"] for r in got] == want
        assert all(r["kernel"] == "kv" and float(r["check"].removeprefix("rel_err=")) < 1e-5 for r in got), got

    monkeypatch.setattr(A, "_configs", configs)
    fwd, bwd = A.block_causal_attention_fwd, A.block_causal_attention_bwd
    second = bench.tile_label(tables["fwd"][1])
    monkeypatch.setattr(A, "block_causal_attention_fwd", lambda *a, config=None, **k: tuple(
        t * (1.25 if config == tables["fwd"][1] else 1.0) for t in fwd(*a, config=config, **k)))
    assert bench.main(["--cases", "tiny", *argv]) == 0          # a wrong candidate is left out
    assert second not in {r["provider"] for r in read_rows(out, "attention") if r["kernel"] == "fwd"}
    monkeypatch.setattr(A, "block_causal_attention_fwd", lambda *a, **k: tuple(t * 1.25 for t in fwd(*a, **k)))
    with pytest.raises(SystemExit, match="tiny/.*: the forward is off the float32 reference"):
        bench.main(["--cases", "tiny", *argv])                   # so is a wrong pinned tile: the run stops
    monkeypatch.setattr(A, "block_causal_attention_fwd", fwd)
    monkeypatch.setattr(A, "block_causal_attention_bwd", lambda *a, **k: (*bwd(*a, **k)[:3], bwd(*a, **k)[3] * 1.25))
    with pytest.raises(SystemExit, match="the backward is off the float32 reference"):     # dscale_mul checked
        bench.main(["--cases", "tiny", *argv])
    monkeypatch.setattr(A, "block_causal_attention_bwd", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no")))
    with pytest.raises(RuntimeError, match="no"):                 # a pinned tile that cannot launch stops it too
        bench.main(["--cases", "tiny", *argv])
    for bad in (["--tiles", "--providers", "fastvar"], ["--tiles", "--no-backward"], ["--dtype", "float32"]):
        with pytest.raises(SystemExit):
            bench.main(bad)
    assert "--dtype float32 is for --tiles" in capsys.readouterr().err


def test_bench_attention_leaves_a_wrong_provider_out(stub_timing, monkeypatch, tmp_path, capsys):
    """A provider whose output is off the reference is reported and not timed, the others still are (a campaign
    stage keeps their rows), and the run exits with status 1."""
    from fastvar import ops
    bench = load_on_cpu("bench_attention", monkeypatch)
    monkeypatch.setattr(bench, "TRAIN_CASES", {"tiny": ((1, 2, 3), 2, 3, 16)})
    monkeypatch.setattr(bench, "KV_CASES", {"kv-tiny": ((1, 2, 3), 2, 3, 16)})
    attention, step = ops.block_causal_attention, ops.kv_cached_attention
    monkeypatch.setattr(ops, "block_causal_attention", lambda *a, **k: attention(*a, **k) * 1.25)
    monkeypatch.setattr(ops, "kv_cached_attention", lambda *a, **k: step(*a, **k) + float("nan"))
    out = tmp_path / "attention.csv"
    assert bench.main(["--cases", "tiny", "kv-tiny", "--providers", "sdpa-dense", "fastvar", "sdpa-precat",
                       "sdpa-cat", "--out", str(out)]) == 1
    assert "wrong results, not timed: tiny/fastvar, kv-tiny/fastvar" in capsys.readouterr().out
    rows = read_rows(out, "attention")
    assert {(r["case"], r["provider"]) for r in rows} == {("tiny", "sdpa-dense"), ("kv-tiny", "sdpa-precat"),
                                                         ("kv-tiny", "sdpa-cat")}


def test_bench_upsample(stub_timing, monkeypatch, tmp_path):
    bench = load_on_cpu("bench_upsample", monkeypatch)
    monkeypatch.setattr(bench, "SCHEDULES", {"256": (1, 2, 3)})
    out = tmp_path / "upsample.csv"
    assert bench.main(["--batches", "1", "2", "--schedules", "256", "--out", str(out)]) == 0
    rows = read_rows(out, "upsample")
    assert {(r["case"], r["batch"], r["schedule"]) for r in rows} == {(op, b, "256") for op in bench.OPS
                                                                      for b in ("1", "2")}
    assert {(r["case"], r["provider"]) for r in rows} == {(op, p) for op in bench.OPS for p in ("eager", "fastvar")} | {
        (op, "fastvar-fused") for op in ("step", "step_idx")}
    for r in rows:
        if r["provider"] != "eager":          # the eager backend here: the same computation, the same bits
            assert r["check"] == "rel_err=0.00e+00 bitwise=True", r
        assert r["gpu_ops_per_scale"] == ("2.0" if r["case"].startswith("step") else ""), r
        assert float(r["GB/s"]) > 0


@pytest.mark.interpreter
def test_bench_upsample_step_on_the_triton_kernels(stub_timing, monkeypatch, tmp_path):
    """The step providers on the Triton kernels (interpreter): ``fastvar`` keeps the eager bits where the
    interpolation's rounding is ATen's, ``fastvar-fused`` (its own conv sums) stays within float32 tolerance."""
    from tolerances import REL
    from tolerances import bit_exact_expected
    monkeypatch.setenv("FASTVAR_BACKEND", "triton")
    bench = load_on_cpu("bench_upsample", monkeypatch)
    monkeypatch.setattr(bench, "SCHEDULES", {"256": (1, 2, 3)})
    out = tmp_path / "upsample.csv"
    assert bench.main(["--ops", "step_idx", "--batches", "2", "--schedules", "256", "--out", str(out)]) == 0
    checks = {r["provider"]: r["check"] for r in read_rows(out, "upsample")}
    assert set(checks) == {"eager", "fastvar", "fastvar-fused"}
    if bit_exact_expected():
        assert checks["fastvar"].endswith("bitwise=True"), checks
    for provider in ("fastvar", "fastvar-fused"):
        err = float(checks[provider].split()[0].removeprefix("rel_err="))
        assert err <= REL[torch.float32], checks


def test_bench_rq_lookup(stub_timing, monkeypatch, tmp_path):
    bench = load_on_cpu("bench_rq_lookup", monkeypatch)
    monkeypatch.setattr(bench, "SCHEDULES", {"256": (1, 2, 3)})
    out = tmp_path / "rq_lookup.csv"
    assert bench.main(["--batches", "1", "2", "--schedules", "256", "--out", str(out)]) == 0
    rows = read_rows(out, "rq_lookup")
    assert sorted((r["case"], r["provider"], r["batch"]) for r in rows) == sorted(
        (op, p, b) for op in bench.OPS for p in ("eager", "fastvar") for b in ("1", "2"))
    for r in rows:
        rows_checked = 9 * int(r["batch"]) if r["case"] == "lookup" else 14 * int(r["batch"])
        if r["provider"] == "fastvar" or r["case"] == "lookup":
            assert r["check"] == f"disagree=0/{rows_checked}", r
        assert float(r["GB/s"]) > 0 and float(r["TFLOP/s"]) > 0


def test_bench_sampling(stub_timing, monkeypatch, tmp_path):
    bench = load_on_cpu("bench_sampling", monkeypatch)
    out = tmp_path / "sampling.csv"
    assert bench.main(["--batches", "1", "2", "--scales", "1", "3", "--V", "64", "--top-k", "10", "--no-compile",
                       "--out", str(out)]) == 0
    rows = read_rows(out, "sampling")
    providers = ("eager", "fastvar-exact", "fastvar-exact-kernel", "fastvar-fast")
    assert sorted((r["provider"], r["B"], r["pn"]) for r in rows) == sorted(
        (p, b, pn) for p in providers for b in ("1", "2") for pn in ("1", "3"))
    for r in rows:
        assert r["check"] == f"0 exact-token differences of {int(r['rows'])}", r
        exact = r["provider"] != "fastvar-fast"      # the fast mode moves no noise tensor
        nbytes = (3 if exact else 2) * int(r["rows"]) * 64 * 4 + int(r["rows"]) * 8
        assert r["GB/s"] == f"{nbytes / 1e3:.1f}", r


@pytest.mark.interpreter
def test_bench_sampling_study(monkeypatch, tmp_path):
    """``--study`` runs the fused kernel in the interpreter on CPU and writes its agreement counts."""
    bench = load_on_cpu("bench_sampling", monkeypatch)
    backend = os.environ.get("FASTVAR_BACKEND")
    out = tmp_path / "study.csv"
    assert bench.main(["--study", "48", "--study-batch", "24", "--V", "16", "--top-k", "4", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [(r["rows"], r["top_k"]) for r in rows] == [("48", "0"), ("48", "4")]
    assert all(int(r["token_differences"]) <= int(r["rows_gap_below_2e_20"]) for r in rows)
    assert os.environ.get("FASTVAR_BACKEND") == backend      # the study's backend is its own, not the next test's


def test_bench_adaln(stub_timing, monkeypatch, tmp_path):
    from tolerances import REL
    bench = load_on_cpu("bench_adaln", monkeypatch)
    monkeypatch.setattr(bench, "WIDTHS", {"tiny": 48})
    monkeypatch.setattr(bench, "SCHEDULES", {"s": (1, 2)})
    out = tmp_path / "adaln.csv"
    assert bench.main(["--batches", "1", "2", "--out", str(out)]) == 0
    rows = read_rows(out, "adaln")
    assert sorted((r["case"], r["provider"], r["dtype"], r["B"]) for r in rows) == sorted(
        (op, p, dt, b) for op in bench.OPS for p in ("eager", "fastvar") for dt in bench.DTYPES for b in ("1", "2"))
    for r in rows:
        errs = dict(kv.split("_rel_err=") for kv in r["check"].split())
        assert set(errs) == ({"h"} if r["case"] == "adaln_modulate" else {"h", "x_new"}), r
        assert all(float(e) <= REL[getattr(torch, r["dtype"])] for e in errs.values()), r
        assert r["N"] == str(2 * int(r["B"])) and r["l"] == "5" and float(r["GB/s"]) > 0


def test_bench_bit_sampling(stub_timing, monkeypatch, tmp_path):
    bench = load_on_cpu("bench_bit_sampling", monkeypatch)
    monkeypatch.setattr(bench, "BITS", 4)
    out = tmp_path / "bit_sampling.csv"
    assert bench.main(["--grids", "3", "5", "--batches", "1", "2", "--out", str(out)]) == 0
    rows = read_rows(out, "bit_sampling")
    assert sorted((r["provider"], r["dtype"], r["tokens"], r["B"]) for r in rows) == sorted(
        (p, dt, f"{g}x{g}", b) for p in ("eager", "fastvar") for dt in bench.DTYPES for g in (3, 5) for b in ("1", "2"))
    for r in rows:
        assert r["check"] == "bits_differing=0 codes_equal=1", r
        assert r["N"] == str(2 * int(r["B"])) and float(r["GB/s"]) > 0


def test_bench_cross_attention(stub_timing, monkeypatch, tmp_path):
    from tolerances import REL
    bench = load_on_cpu("bench_cross_attention", monkeypatch)
    monkeypatch.setattr(bench, "HEADS", 2)
    monkeypatch.setattr(bench, "HEAD_DIM", 16)
    monkeypatch.setattr(bench, "DTYPE", "float32")       # the interpreter's dtype
    out = tmp_path / "cross_attention.csv"
    assert bench.main(["--grids", "3", "--batches", "1", "2", "--out", str(out)]) == 0
    rows = read_rows(out, "cross_attention")
    assert sorted((r["provider"], r["text"], r["B"]) for r in rows) == sorted(
        (p, t, b) for p in ("eager", "fastvar") for t in bench.TEXTS for b in ("1", "2"))
    for r in rows:
        assert float(r["check"].split("rel_err=")[1]) <= REL[torch.float32], r
        assert r["N"] == str(2 * int(r["B"])) and float(r["TFLOP/s"]) > 0


def test_bench_e2e(monkeypatch, tmp_path):
    """``bench/bench_e2e.py`` is ``fastvar bench``: the smoke model on CPU, the common rows plus the per-scale ones
    (the providers themselves are covered by tests/test_cli.py)."""
    bench = load_on_cpu("bench_e2e", monkeypatch)
    assert bench.main(["--smoke", "--batches", "1", "--providers", "fastvar", "--dtype", "float32", "--reps", "1",
                       "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("e2e_*.csv")
    rows = read_rows(path, "e2e")
    assert [r["scale"] for r in rows] == ["", "0", "1", "2", "3"]
    assert all(r["case"] == "d2-smoke" and r["provider"] == "fastvar" and float(r["ms"]) > 0 for r in rows)


def test_contributing_table_matches_the_tree():
    """CONTRIBUTING.md's per-op table names files that exist, and every op, Triton kernel, test of an op and
    benchmark of the tree has its row (the end-to-end benchmarks aside)."""
    import re
    root = os.path.dirname(BENCH)
    text = open(os.path.join(root, "CONTRIBUTING.md")).read()
    table = re.search(r"\| op \| reference \| Triton kernel \| CUDA kernel \| op \| test \| bench \|\n\|[-|]+\|\n"
                      r"((?:\|.*\|\n)+)", text).group(1)
    rows = [[c.strip().strip("`") for c in line.strip("|").split("|")] for line in table.splitlines()]
    for op, reference, kernel, cuda, op_file, test, bench in rows:
        assert (kernel, op_file, test, bench) == (f"triton_kernels/{op}.py", f"fastvar/ops/{op}.py",
                                                  f"tests/test_{op}.py", f"bench/bench_{op}.py"), op
        for f in (reference, kernel, cuda, op_file, test, bench):
            assert not f or os.path.exists(os.path.join(root, f)), f"{op}: {f} does not exist"
    ops = {r[0] for r in rows}
    in_tree = {f[:-3] for f in os.listdir(os.path.join(root, "fastvar", "ops")) if not f.startswith("_")
               and f.endswith(".py")} - {"cuda_ext"}
    assert ops == in_tree
    assert ops == {f[:-3] for f in os.listdir(os.path.join(root, "triton_kernels"))
                   if not f.startswith("_") and f.endswith(".py")}
    end_to_end = {"bench_e2e.py", "bench_infinity.py"}         # whole samples: VAR's and Infinity's
    assert {f"bench_{op}.py" for op in ops} | end_to_end == {f for f in os.listdir(BENCH) if f.endswith(".py")}


@pytest.mark.slow
def test_bench_infinity_smoke(monkeypatch, tmp_path, capsys):
    """The Infinity end-to-end benchmark's code path on a tiny CPU model: the common columns, both providers and
    their per-scale rows (the timings mean nothing)."""
    bench = load_on_cpu("bench_infinity", monkeypatch)
    assert bench.main(["--smoke", "--batches", "1", "--reps", "1", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("infinity_e2e_*.csv")
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0])[:len(benchmarking.COLUMNS)] == list(benchmarking.COLUMNS)
    whole = [r for r in rows if r["scale"] == ""]
    assert [r["provider"] for r in whole] == ["official", "fastvar"] and all(float(r["ms"]) > 0 for r in whole)
    for r in whole:
        floor = max(float(r["flop_floor_ms"]), float(r["weight_floor_ms"]))
        assert float(r["weight_floor_ms"]) > 0
        assert float(r["over_floor"]) == pytest.approx(float(r["ms"]) / floor, rel=0.01, abs=0.01)
    for provider in ("official", "fastvar"):                 # the 0.06M template: 7 scales
        assert [int(r["scale"]) for r in rows if r["scale"] and r["provider"] == provider] == list(range(7))
    assert bench.official.varlen_kvpacked_bf16 is not bench.varlen_as_sdpa       # put back after the runs
    # the README's table of it (scripts/results_table.py): the whole-sample rows, the columns that hold values
    table = benchmarking.markdown_table(str(path)).splitlines()
    assert table[0].startswith("infinity_e2e on cpu") and f"`{path.name}`" in table[0]
    assert table[2] == ("| case | batch | provider | ms | speedup_vs_eager | over_floor | flop_floor_ms | "
                        "weight_floor_ms |")                     # peak_MB: empty on CPU
    assert [line.split(" | ")[2] for line in table[4:]] == ["official", "fastvar"]
    script = load_on_cpu("results_table", monkeypatch, folder=os.path.join(os.path.dirname(BENCH), "scripts"))
    capsys.readouterr()
    assert script.main([str(path)]) == 0 and capsys.readouterr().out.splitlines() == table


def test_results_table_renders_every_committed_csv():
    """CONTRIBUTING's ``scripts/results_table.py CSV...`` on whatever bench/results/ holds, studies included
    (their own columns, no ``bench``): a header line naming the device and commit, then every row."""
    import glob
    paths = sorted(glob.glob(os.path.join(os.path.dirname(BENCH), "bench", "results", "**", "*.csv"), recursive=True))
    assert paths, "bench/results/ holds no CSV"
    for path in paths:
        table = benchmarking.markdown_table(path).splitlines()
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if not r.get("scale")]
        assert f"commit {rows[0]['commit']}" in table[0] and rows[0]["device"] in table[0], table[0]
        assert len(table) == 4 + len(rows) and table[3].startswith("|---|")


def test_bench_infinity_cross_attention_call_is_flash_attns(monkeypatch):
    """The official loop's flash-attn call in bench_infinity (one SDPA call for equal lengths) computes what the
    golden files' definition of it does, in the official dtype."""
    bench = load_on_cpu("bench_infinity", monkeypatch)
    g = torch.Generator().manual_seed(0)
    for B, Lq, Lk in ((3, 5, 7), (2, 1, 77)):                 # image tokens; the attentive pool's one query
        q = torch.randn(B * Lq, 4, 16, generator=g).bfloat16()
        kv = torch.randn(B * Lk, 2, 4, 16, generator=g).bfloat16()
        cu_q, cu_k = (torch.arange(0, n * (B + 1), n, dtype=torch.int32) for n in (Lq, Lk))
        want = bench.official.varlen_kvpacked_bf16(q, kv, cu_q, cu_k, 0.25)
        got = bench.varlen_as_sdpa(q, kv, cu_q, cu_k, 0.25)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert_rel(got.float(), want.float(), 2 ** -7, f"B={B} Lq={Lq} Lk={Lk}")     # bf16 rounding of the output

