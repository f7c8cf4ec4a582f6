"""The ``fastvar`` command as a new user runs it."""
import csv
import os
import struct
import subprocess
import sys
import zlib

import pytest
import torch

import fastvar
from builders import tiny_vae_var
from fastvar.cli import main
from fastvar.utils.benchmarking import COLUMNS


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastvar.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def read_png(path):
    """(width, height, RGB bytes) of an 8-bit RGB PNG, checking every chunk's CRC."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
            assert body[8:10] == b"\x08\x02"
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h = size
    raw = zlib.decompress(idat)
    assert len(raw) == h * (1 + 3 * w)
    return w, h, raw


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Checkpoints a user would make with torch.save of a small random model's state dicts."""
    folder = tmp_path_factory.mktemp("ckpt")
    vae, var = tiny_vae_var()
    torch.save(var.state_dict(), folder / "var.pth")
    torch.save(vae.state_dict(), folder / "vae.pth")
    return str(folder / "var.pth"), str(folder / "vae.pth")


def test_info_lists_versions_and_backends():
    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    assert f"fastvar {fastvar.__version__}" in r.stdout and f"torch {torch.__version__}" in r.stdout
    for word in ("backends:", "eager", "triton", "cuda", "block_causal_attention", "rq_lookup"):
        assert word in r.stdout
    if not torch.cuda.is_available():
        assert "no GPU" in r.stdout


@pytest.mark.slow
def test_sample_writes_a_png_grid(tmp_path, checkpoints):
    var_ckpt, vae_ckpt = checkpoints
    out = tmp_path / "grid.png"
    r = run_cli("sample", "--var-ckpt", var_ckpt, "--vae-ckpt", vae_ckpt, "--labels", "3,7,1", "--seed", "0",
                "--top-k", "20", "--top-p", "0.9", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    w, h, raw = read_png(out)
    assert (w, h) == (2 + 2 * 18, 2 + 2 * 18)        # 3 images of 16x16 in a 2x2 grid with 2-px padding
    again = tmp_path / "again.png"
    r = run_cli("sample", "--var-ckpt", var_ckpt, "--vae-ckpt", vae_ckpt, "--labels", "3,7,1", "--seed", "0",
                "--top-k", "20", "--top-p", "0.9", "--out", str(again))
    assert r.returncode == 0, r.stderr
    assert read_png(again)[2] == raw, "the same seed must give the same picture"


@pytest.mark.parametrize("args,message", [
    (["--labels", "3,10"], "--labels: class 10 is out of range; this model has classes 0..9"),
    (["--labels", "3,x"], "--labels must be comma-separated class ids"),
    (["--labels", "1", "--top-k", "-2"], "top_k must be >= 0"),
    (["--labels", "1", "--top-p", "2"], "top_p must be in [0.0, 1.0]"),
    (["--labels", "1", "--cfg", "nan"], "cfg must be finite"),
])
def test_sample_bad_arguments(tmp_path, checkpoints, capsys, args, message):
    var_ckpt, vae_ckpt = checkpoints
    out = tmp_path / "x.png"
    assert main(["sample", "--var-ckpt", var_ckpt, "--vae-ckpt", vae_ckpt, "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_sample_unwritable_output_fails_before_sampling(tmp_path, checkpoints, capsys):
    var_ckpt, vae_ckpt = checkpoints
    assert main(["sample", "--var-ckpt", var_ckpt, "--vae-ckpt", vae_ckpt, "--labels", "1",
                 "--out", str(tmp_path / "missing" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sample", "--var-ckpt", var_ckpt, "--labels", "1", "--out", str(tmp_path / "y.png")]) == 2
    assert "pass both --var-ckpt and --vae-ckpt" in capsys.readouterr().err
    assert main(["sample", "--var-ckpt", var_ckpt, "--vae-ckpt", vae_ckpt, "--out", str(tmp_path / "z.png")]) == 2
    assert "--labels is required with checkpoints" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_bench_smoke_runs_every_provider_path(tmp_path, capsys):
    """`fastvar bench --smoke`: the benchmark's code path on a tiny CPU model (timings mean nothing)."""
    assert main(["bench", "--smoke", "--batches", "2", "--providers", "eager", "fastvar", "fastvar-fused",
                 "fastvar-generate", "--dtype", "float32", "--reps", "1", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "d2-smoke" in out and "per scale (fastvar, ms)" in out and "per scale (fastvar-fused, ms)" in out
    csvs = list(tmp_path.glob("e2e_*.csv"))
    assert len(csvs) == 1
    rows = list(csv.DictReader(open(csvs[0])))
    assert list(rows[0])[:len(COLUMNS)] == list(COLUMNS)
    for col in ("model", "batch", "scale", "ms_per_image", "images_per_s", "flop_floor_ms", "weight_floor_ms",
                "over_floor", "vae_decode_ms", "fid50k_hours_1gpu", "fid50k_hours_8gpu"):
        assert col in rows[0]
    whole = [r for r in rows if r["scale"] == ""]
    for r in whole:                              # the time over the higher floor (both rounded in the CSV)
        floor = max(float(r["flop_floor_ms"]), float(r["weight_floor_ms"]))
        assert float(r["weight_floor_ms"]) > 0
        assert float(r["over_floor"]) == pytest.approx(float(r["ms"]) / floor, rel=0.01, abs=0.01)
    assert [r["provider"] for r in whole] == ["eager", "fastvar", "fastvar-fused", "fastvar-generate"]
    assert all(float(r["fid50k_hours_1gpu"]) > 8 * float(r["fid50k_hours_8gpu"]) * 0.99 > 0 for r in whole)
    assert all(float(r["ms"]) > 0 and r["bench"] == "e2e" and r["case"] == "d2-smoke" for r in whole)
    for p in ("fastvar", "fastvar-fused"):       # the per-scale breakdown: one row per scale of the smoke schedule
        assert [int(r["scale"]) for r in rows if r["provider"] == p and r["scale"]] == [0, 1, 2, 3]


def test_bench_smoke_compile_provider_traces_the_official_blocks(tmp_path, capsys, monkeypatch):
    """The ``compile`` provider (the official loop, every block under ``torch.compile(dynamic=True)``) on a tiny
    CPU model, with Dynamo's ``eager`` backend (its tracing and guards, without Inductor's ~1 min of codegen on
    2 cores): its rows, and Dynamo really compiled the block."""
    from torch._dynamo.utils import counters
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="eager", **kw))
    counters.clear()
    assert main(["bench", "--smoke", "--batches", "1", "2", "--providers", "eager", "compile", "--dtype", "float32",
                 "--reps", "1", "--out-dir", str(tmp_path)]) == 0
    assert counters["stats"]["unique_graphs"] >= 1
    rows = list(csv.DictReader(open(next(tmp_path.glob("e2e_*.csv")))))
    assert sorted((r["provider"], r["batch"]) for r in rows if r["scale"] == "") == [
        ("compile", "1"), ("compile", "2"), ("eager", "1"), ("eager", "2")]


def test_weight_floor_reads_condition_weights_once():
    """The weight-bandwidth floor: the attention, MLP and head weights at every scale, the AdaLN projections and
    the embedding tables once per sample, in the compute dtype, at the given bandwidth."""
    from fastvar.benchmark import weight_floor_ms
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Module()])
    model.blocks[0].attn = torch.nn.Linear(4, 12, bias=False)        # 48 per scale
    model.blocks[0].ada_lin = torch.nn.Linear(4, 24, bias=False)     # 96 once
    model.class_emb = torch.nn.Embedding(10, 4)                     # 40 once
    model.head = torch.nn.Linear(4, 8, bias=False)                  # 32 per scale
    bytes_read = ((48 + 32) * 3 + 96 + 40) * 2                      # 3 scales, bf16
    assert weight_floor_ms(model, 3, torch.bfloat16, gbs=2.0) == pytest.approx(bytes_read / 2e9 * 1e3)
    assert weight_floor_ms(model, 3, torch.float32, gbs=2.0) == pytest.approx(2 * bytes_read / 2e9 * 1e3)


def test_bench_without_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "--models", "d16", "--batches", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_sample_with_the_bundled_model_as_the_readme_says(tmp_path):
    out = tmp_path / "digits.png"
    r = run_cli("sample", "--labels", "0,1,2,3", "--seed", "0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"to {out}" in r.stdout
    w, h, _ = read_png(out)
    assert (w, h) == (2 + 8 * 66, 2 + 4 * 66)        # 8 per class (default), 16 px shown x4, one row per digit


def test_sample_stream_and_progress(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--labels", "7", "--num-per-class", "5", "--batch-size", "2", "--stream", "--seed", "1",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "[sample]" in captured.err and "5 images" in captured.err          # the progress bar, 3 batches
    for si in range(4):
        assert f"scale {si} preview: {tmp_path / f'grid_scale{si}.png'}" in captured.out
        assert read_png(tmp_path / f"grid_scale{si}.png")[:2] == read_png(out)[:2]
    # the last scale's preview is the final picture
    assert read_png(tmp_path / "grid_scale3.png")[2] == read_png(out)[2]


@pytest.mark.parametrize("labels,message", [("3,12", "--labels: class 12 is out of range; this model has classes 0..9"),
                                            ("seven", "--labels must be comma-separated class ids")])
def test_sample_bundled_bad_labels(tmp_path, capsys, labels, message):
    out = tmp_path / "x.png"
    assert main(["sample", "--labels", labels, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
