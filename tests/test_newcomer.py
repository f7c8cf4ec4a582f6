"""A newcomer's path: the bundled model samples with its own settings from Python as from the command line, the
README's first Python lines run as written, the command explains itself, progress is for terminals only, and
the README's picture is what its caption says."""
import io
import os
import re
import subprocess
import sys

import pytest
import torch

import fastvar
from builders import tiny_vae_var
from fastvar.cli import build_parser, main
from fastvar.pretrained import load_digits
from fastvar.sampler import Sampler
from fastvar.settings import SamplingSettings, check_seed, default_settings
from fastvar.utils.progress import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


@pytest.fixture(scope="module")
def digits():
    return load_digits()


# ------------------------------------------------------------------------------ defaults travel with the model
def test_bundled_model_samples_with_its_own_settings(digits):
    vae, var, info = digits
    assert var.recommended_settings == SamplingSettings(2.0, 0, 0.0) == SamplingSettings(
        info["cfg"], info["top_k"], info["top_p"])
    sampler = Sampler(var, vae, dtype=torch.float32)
    assert sampler.settings() == var.recommended_settings
    images = sampler.sample([0, 7], seed=0)              # as a newcomer writes it: no settings
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert torch.equal(images, sampler.sample([0, 7], seed=0, cfg=2, top_k=0, top_p=0))
    assert sampler.settings(cfg=3.5) == SamplingSettings(3.5, 0, 0.0)        # one given, the others the model's


def test_default_dtype_sampler_on_the_bundled_model(digits):
    """The README's Python lines, as written (no dtype): on CPU the weights' float32, so the same images as the
    model's own official API and ``fastvar sample`` for the seed (bfloat16 moved about 1 token in 9 there)."""
    vae, var, _ = digits
    sampler = fastvar.Sampler(var, vae)
    assert sampler.dtype == torch.float32
    images = sampler.sample([0, 7], seed=0)
    assert images.shape == (2, 3, 16, 16)
    assert torch.equal(images, var.autoregressive_infer_cfg(2, torch.tensor([0, 7]), g_seed=0, cfg=2, top_k=0,
                                                            top_p=0))


def test_models_without_settings_get_the_released_ones_capped_at_V():
    _, var = tiny_vae_var((1, 2, 4), V=64)
    assert default_settings(var) == SamplingSettings(1.5, 64, 0.96)
    _, big = tiny_vae_var((1, 2, 4), V=1024)
    assert default_settings(big) == SamplingSettings(1.5, 900, 0.96)
    assert Sampler(var, dtype=torch.float32).sample([1], seed=0).shape == (1, 3, 16, 16)
    var.recommended_settings = (1, 2, 3)
    with pytest.raises(TypeError, match="recommended_settings must be a SamplingSettings or None"):
        Sampler(var).settings()


@pytest.mark.parametrize("seed,error", [(1.5, TypeError), (2.0, TypeError), (True, TypeError), ("3", TypeError),
                                        (2 ** 64, ValueError), (-2 ** 63 - 1, ValueError)])
def test_seeds_are_ints_in_torchs_range(seed, error):
    with pytest.raises(error, match="seed must be"):
        check_seed(seed)
    _, var = tiny_vae_var((1, 2, 4))
    with pytest.raises(error, match="seed must be"):
        Sampler(var).sample([1], seed=seed)
    with pytest.raises(error, match="g_seed must be"):
        var.autoregressive_infer_cfg(1, 1, g_seed=seed)


def test_seeds_map_as_torch_maps_them():
    assert check_seed(-1) == -1 and check_seed(2 ** 64 - 1) == 2 ** 64 - 1
    a = torch.Generator().manual_seed(-1).initial_seed()
    assert a == torch.Generator().manual_seed(2 ** 64 - 1).initial_seed()


def test_readme_python_section_starts_with_the_bundled_model_on_cpu():
    """The first Python block of the README runs as written: no checkpoint, no GPU."""
    section = README[README.index("From Python"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "load_digits" in block and "cuda" not in block and ".pth" not in block
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["images"].shape == (2, 3, 16, 16)
    later = section[section.index(block) + len(block):]
    assert "load_vae_var" in later, "released checkpoints come after the bundled model"


# ------------------------------------------------------------------------------ the command explains itself
def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fastvar {fastvar.__version__}"


def test_python_dash_m_fastvar():
    r = subprocess.run([sys.executable, "-m", "fastvar", "--version"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == f"fastvar {fastvar.__version__}", r.stderr


def test_every_option_says_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert "default" in (action.help or ""), f"fastvar {name} {action.option_strings[0]}: {action.help!r}"


def test_bench_output_explains_its_columns(capsys):
    assert main(["bench", "--smoke", "--batches", "1", "--providers", "fastvar", "--dtype", "float32",
                 "--reps", "1"]) == 0
    out = capsys.readouterr().out
    head = out[:out.index("d2-smoke")]
    for word in ("columns:", "B = batch size", "img/s", "xN = speedup over eager", "floor", "decode", "per scale",
                 "providers:", "eager =", "compile =", "fastvar ="):
        assert word in head, word


# ------------------------------------------------------------------------------ progress
class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal():
    log, tty = io.StringIO(), Terminal()
    for stream in (log, tty):
        p = Progress(3, "[x]", stream=stream)
        for i in range(1, 4):
            p.update(i)
        p.close("done")
    assert "\r" not in log.getvalue() and log.getvalue().startswith("[x] done (")
    assert "\r[x] |" in tty.getvalue() and tty.getvalue().endswith("\n")


def test_progress_waits_for_its_delay():
    tty = Terminal()
    p = Progress(3, "[x]", stream=tty, delay=60)
    p.update(3)
    assert tty.getvalue() == ""


def test_single_batch_runs_show_progress_per_scale_on_a_terminal(tmp_path, monkeypatch, capsys):
    import fastvar.cli as cli
    tty = Terminal()
    monkeypatch.setattr(cli, "sample_progress", lambda total, quiet: Progress(total, "[sample]", enabled=not quiet,
                                                                             stream=tty))
    assert main(["sample", "--labels", "3", "--num-per-class", "2", "--out", str(tmp_path / "x.png")]) == 0
    bars = re.findall(r"\|[#-]+\| (\d+)/(\d+)", tty.getvalue())
    assert bars and bars[-1] == ("4", "4"), tty.getvalue()      # one batch, 4 scales: counted per scale
    assert "\r" not in capsys.readouterr().err                   # and nothing drawn on the (captured) stderr


# ------------------------------------------------------------------------------ streaming and the pyramid
def test_stream_writes_each_preview_as_its_scale_finishes(tmp_path, monkeypatch):
    import fastvar.cli as cli
    from fastvar.sampler.var import VARAdapter
    events = []
    step, write = VARAdapter.step, cli.write_picture
    monkeypatch.setattr(VARAdapter, "step", lambda self, buf, si, s: events.append(f"step {si}") or step(
        self, buf, si, s))
    monkeypatch.setattr(cli, "write_picture", lambda image, path, name="--out": events.append(
        f"write {os.path.basename(path)}") or write(image, path, name))
    assert main(["sample", "--labels", "3", "--num-per-class", "2", "--batch-size", "1", "--stream",
                 "--out", str(tmp_path / "x.png")]) == 0
    per_batch = ["step 0", "write x_scale0.png", "step 1", "write x_scale1.png", "step 2", "write x_scale2.png",
                 "step 3", "write x_scale3.png"]
    assert events == per_batch + per_batch + ["write x.png"]


def _readme_pyramid_command():
    m = re.search(r"\*Written by `fastvar (sample [^`]*--pyramid docs/digits_pyramid\.png[^`]*)`", README)
    assert m, "the README's caption must say which command writes docs/digits_pyramid.png"
    return m.group(1).split()


def test_the_readme_picture_is_what_its_caption_says(tmp_path):
    from test_cli import read_png
    argv = _readme_pyramid_command()
    argv = [str(tmp_path / os.path.basename(a)) if a.endswith(".png") else a for a in argv]
    assert main(argv) == 0
    w, h, got = read_png(tmp_path / "digits_pyramid.png")
    W, H, want = read_png(os.path.join(ROOT, "docs", "digits_pyramid.png"))
    assert (w, h) == (W, H) == (2 + 10 * 66, 2 + 4 * 66)      # ten digits, four scales, 16 px shown x4
    differ = sum(a != b for a, b in zip(got, want))
    assert differ <= 0.02 * len(want), f"{differ} of {len(want)} bytes differ from docs/digits_pyramid.png"


def test_pyramid_rows_are_the_scales_and_the_last_is_the_sample(tmp_path):
    from test_cli import read_png
    out, pyr = tmp_path / "grid.png", tmp_path / "pyr.png"
    assert main(["sample", "--labels", "1,2,3", "--num-per-class", "1", "--display-scale", "1", "--out", str(out),
                 "--pyramid", str(pyr)]) == 0
    w, h, raw = read_png(pyr)
    assert (w, h) == (2 + 3 * 18, 2 + 4 * 18)
    gw, gh, graw = read_png(out)                                 # 3 images in a 2x2 grid
    row = lambda data, width, y: data[y * (1 + 3 * width) + 1:(y + 1) * (1 + 3 * width)]   # noqa: E731
    for y in range(16):   # the first image of the last pyramid row is the first image of the grid
        assert row(raw, w, 2 + 3 * 18 + y)[6:6 + 48] == row(graw, gw, 2 + y)[6:6 + 48]


def test_quick_subset_of_the_readme_exists():
    """The README's quick test command selects by markers pyproject.toml declares."""
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    m = re.search(r'pytest -q -m "([^"]+)"', README)
    assert m, "the README must give a quick test selection"
    for marker in re.findall(r"not (\w+)", m.group(1)):
        assert f'"{marker}:' in pyproject, marker
