"""Every user error of the ``fastvar`` command ends with one line naming the argument and exit status 2, and
writes nothing; ``fastvar info`` never crashes. The checks of the commands that sample run for ``sample`` and
``generate`` alike (``sampling_args``)."""
import errno
import os
import sys
import zipfile

import pytest
import torch

import fastvar
from builders import tiny_vae_var
from fastvar import cli
from fastvar.cli import main
from fastvar.sampler import Sampler


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    vae, var = tiny_vae_var((1, 2, 4))
    torch.save(var.state_dict(), folder / "var.pth")
    torch.save(vae.state_dict(), folder / "vae.pth")
    return str(folder / "var.pth"), str(folder / "vae.pth")


def fails(capsys, argv, *needles):
    """``fastvar argv`` exits with status 2 and one line on stderr holding every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fastvar {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def sample_args(checkpoints, out, *more):
    return ["sample", "--var-ckpt", checkpoints[0], "--vae-ckpt", checkpoints[1], "--labels", "1", "--top-k", "5",
            "--out", str(out), *more]


def generate_args(checkpoints, out, *more):
    return ["generate", "--var-ckpt", checkpoints[0], "--vae-ckpt", checkpoints[1], "--classes", "1",
            "--num-per-class", "1", "--top-k", "5", "--quiet", "--out-dir", str(out), *more]


@pytest.fixture(params=["sample", "generate"])
def sampling_args(request, checkpoints, tmp_path):
    """``sampling_args(*more)``: the argv of each command that samples, on the checkpoints, writing in tmp_path."""
    if request.param == "sample":
        return lambda *more: sample_args(checkpoints, tmp_path / "x.png", *more)
    return lambda *more: generate_args(checkpoints, tmp_path / "gen", *more)


def cpu_args(args):
    """``args`` run on CPU: sample's ``--device cpu``; generate takes the GPU where there is one, so skip there."""
    if args[0] == "generate" and torch.cuda.is_available():
        pytest.skip("generate samples on the GPU of this machine")
    return args + ["--device", "cpu"] if args[0] == "sample" else args


@pytest.fixture
def no_sampling(monkeypatch):
    """Errors that must come before any sampling: the sampler is never reached."""
    def refuse(*args, **kwargs):
        raise AssertionError("sampling started before the arguments were checked")
    monkeypatch.setattr(Sampler, "stream", refuse)


# ---------------------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("seed", ["-1", str(2 ** 63), str(10 ** 30)])
def test_seed_outside_the_range_says_how_seeds_map(tmp_path, capsys, checkpoints, no_sampling, seed):
    fails(capsys, sample_args(checkpoints, tmp_path / "x.png", "--seed", seed),
          f"--seed must be an int in [0, 2**63), got {seed}", "seeds one torch.Generator for the whole run")
    assert not list(tmp_path.iterdir())


def test_largest_seed_works(tmp_path, checkpoints):
    assert main(sample_args(checkpoints, tmp_path / "x.png", "--seed", str(2 ** 63 - 1))) == 0


# ---------------------------------------------------------------------------------------------- writing
def test_a_write_that_fails_after_sampling_is_one_line_and_leaves_nothing(tmp_path, capsys, checkpoints, monkeypatch):
    import fastvar.utils.images as images

    def disk_full(path, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(images, "atomic_write", disk_full)
    out = tmp_path / "x.png"
    fails(capsys, sample_args(checkpoints, out), f"--out: could not write {out}: No space left on device")
    assert not list(tmp_path.iterdir())


def test_the_output_folder_is_tried_before_sampling(tmp_path, capsys, checkpoints, monkeypatch, no_sampling):
    """Permission bits do not tell everything (root, read-only file systems): a file is created there first."""
    import fastvar.utils.files as files

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    fails(capsys, sample_args(checkpoints, tmp_path / "x.png"), f"--out: cannot create a file in {tmp_path}: "
                                                                f"Read-only file system")


def test_stream_and_pyramid_paths_are_checked_first(tmp_path, capsys, checkpoints, no_sampling):
    os.mkdir(tmp_path / "x_scale1.png")                      # a folder where a preview would go
    fails(capsys, sample_args(checkpoints, tmp_path / "x.png", "--stream"), "--out (with --stream) must be a file "
                                                                             "path, got a folder")
    fails(capsys, sample_args(checkpoints, tmp_path / "y.png", "--pyramid", str(tmp_path / "no" / "p.png")),
          "--pyramid: the folder", "does not exist")


@pytest.mark.parametrize("name", ["grid.jpg", "grid.webp", "grid"])
def test_other_extensions_without_pillow_are_refused(tmp_path, capsys, checkpoints, monkeypatch, no_sampling, name):
    monkeypatch.setitem(sys.modules, "PIL", None)            # import PIL fails as if it were not installed
    fails(capsys, sample_args(checkpoints, tmp_path / name), "--out: ", ".png")
    assert not list(tmp_path.iterdir())


def test_unknown_extension_is_refused(tmp_path, capsys, checkpoints, no_sampling):
    fails(capsys, sample_args(checkpoints, tmp_path / "grid.txt"), "--out: cannot write .txt files")


def test_jpeg_is_written_as_jpeg_with_pillow(tmp_path, checkpoints):
    pytest.importorskip("PIL")
    out = tmp_path / "grid.jpg"
    assert main(sample_args(checkpoints, out)) == 0
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"           # JPEG's start-of-image marker, not PNG bytes


# ---------------------------------------------------------------------------------------------- bench
@pytest.mark.parametrize("reps", ["0", "-3"])
def test_bench_reps_must_be_positive(capsys, reps):
    fails(capsys, ["bench", "--smoke", "--reps", reps], "--reps must be >= 1", f"got {reps}")


def test_bench_profile_needs_an_out_dir(capsys):
    fails(capsys, ["bench", "--smoke", "--profile"], "--profile: the tables go to --out-dir")


def test_bench_out_dir_is_checked_first(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    fails(capsys, ["bench", "--smoke", "--out-dir", str(tmp_path / "file" / "results")], "--out-dir")


# ---------------------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("value", ["foo", "CUDA ", "cuda", "triton"])
def test_info_never_crashes_whatever_the_backend_variable(capsys, monkeypatch, value):
    monkeypatch.setenv("FASTVAR_BACKEND", value)
    monkeypatch.setattr("fastvar.ops._backend.triton_interpret", lambda: False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "rq_lookup" in out and "backends:" in out


def test_a_wrong_backend_variable_is_one_line(capsys, monkeypatch, no_sampling, sampling_args):
    monkeypatch.setenv("FASTVAR_BACKEND", "foo")
    fails(capsys, sampling_args(), "environment variable FASTVAR_BACKEND must be one of cuda, triton, eager")
    fails(capsys, ["bench", "--smoke"], "FASTVAR_BACKEND must be one of")


def test_triton_forced_without_a_gpu_or_the_interpreter(capsys, monkeypatch, no_sampling, sampling_args):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: Triton can run")
    monkeypatch.setenv("FASTVAR_BACKEND", "triton")
    monkeypatch.setattr("fastvar.ops._backend.triton_interpret", lambda: False)
    fails(capsys, sampling_args(), "FASTVAR_BACKEND=triton cannot run on cpu here", "TRITON_INTERPRET=1")


def test_the_cuda_extension_forced_on_cpu(capsys, monkeypatch, no_sampling, sampling_args):
    monkeypatch.setenv("FASTVAR_BACKEND", "cuda")
    fails(capsys, cpu_args(sampling_args()), "FASTVAR_BACKEND=cuda cannot run on cpu here")


# ---------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("more,option", [
    (["--num-per-class", str(10 ** 9)], "--num-per-class 1000000000"),
    (["--display-scale", str(10 ** 6)], "--display-scale 1000000"),
    (["generate", "--num-per-class", str(10 ** 9), "--batch-size", str(10 ** 9)], "--batch-size 1000000000"),
])
def test_too_large_for_memory_is_refused_before_allocating(tmp_path, capsys, checkpoints, no_sampling, more, option):
    if more[0] == "generate":
        fails(capsys, generate_args(checkpoints, tmp_path / "gen", *more[1:]), option, "GiB is available")
        assert not (tmp_path / "gen" / "shards").exists()
    else:
        fails(capsys, sample_args(checkpoints, tmp_path / "x.png", *more), option, "GiB is available")


def test_a_batch_too_large_for_memory_names_batch_size(capsys, monkeypatch, no_sampling, sampling_args):
    monkeypatch.setattr(cli, "sample_memory", lambda *a, **k: {"pictures": 1, "batch": 2 ** 60})
    fails(capsys, sampling_args("--batch-size", "9"), "--batch-size 9: sampling one batch needs about")


def test_the_estimate_grows_with_what_is_kept():
    vae, var = tiny_vae_var((1, 2, 4))
    one = cli.sample_memory(var, vae, 10, 10, 1, 1)
    assert cli.sample_memory(var, vae, 20, 10, 1, 1)["pictures"] == 2 * one["pictures"]
    assert cli.sample_memory(var, vae, 10, 10, 4, 1)["pictures"] > 10 * one["pictures"]
    assert cli.sample_memory(var, vae, 10, 10, 1, 4)["pictures"] == 4 * one["pictures"]
    assert cli.sample_memory(var, vae, 10, 20, 1, 1)["batch"] == one["batch"]      # batch capped at the images
    assert cli.sample_memory(var, vae, 40, 20, 1, 1)["batch"] > one["batch"]


# ---------------------------------------------------------------------------------------------- checkpoints
def _not_checkpoints(folder):
    (folder / "text.pth").write_text("hello, I am not a checkpoint\n")
    (folder / "empty.pth").write_bytes(b"")
    with zipfile.ZipFile(folder / "zip.pth", "w") as z:
        z.writestr("readme.txt", "a zip archive, but not torch.save's")
    os.mkdir(folder / "folder.pth")
    return {"text.pth": "is not a checkpoint written by torch.save (it starts with b'hello, I'",
            "empty.pth": "is not a checkpoint written by torch.save (it is empty",
            "zip.pth": "could not be read with torch.load(weights_only=True)",
            "folder.pth": "must be a file, got a folder"}


def test_a_file_that_is_not_a_checkpoint(tmp_path, capsys, checkpoints, no_sampling):
    for name, message in _not_checkpoints(tmp_path).items():
        fails(capsys, ["sample", "--var-ckpt", str(tmp_path / name), "--vae-ckpt", checkpoints[1], "--labels", "1",
                       "--out", str(tmp_path / "x.png")], "--var-ckpt: VAR checkpoint", message)
        fails(capsys, ["sample", "--var-ckpt", checkpoints[0], "--vae-ckpt", str(tmp_path / name), "--labels", "1",
                       "--out", str(tmp_path / "x.png")], "--vae-ckpt: VQVAE checkpoint", message)


def test_swapped_checkpoints(tmp_path, capsys, checkpoints, no_sampling):
    fails(capsys, ["sample", "--var-ckpt", checkpoints[1], "--vae-ckpt", checkpoints[0], "--labels", "1",
                   "--out", str(tmp_path / "x.png")], "is a VQVAE checkpoint, not a VAR one",
          "did you swap --var-ckpt and --vae-ckpt?")


def test_an_infinity_checkpoint_in_the_vqvae_slot_is_named_not_called_swapped(tmp_path, capsys, checkpoints,
                                                                             no_sampling):
    from test_infinity_models import tiny_pair
    _, infinity = tiny_pair()
    torch.save(infinity.state_dict(), tmp_path / "infinity.pth")
    err = fails(capsys, ["sample", "--var-ckpt", checkpoints[0], "--vae-ckpt", str(tmp_path / "infinity.pth"),
                         "--labels", "1", "--out", str(tmp_path / "x.png")],
                "this is an Infinity checkpoint", "fastvar.load_infinity")
    assert "swap" not in err


def test_a_var_and_a_vqvae_that_are_not_a_pair(tmp_path, capsys, checkpoints, no_sampling):
    vae16, _ = fastvar.build_vae_var("cpu", depth=1, ch=32, V=64, Cvae=16, patch_nums=(1, 2, 4),
                                     vae_kwargs=dict(ch_mult=(1, 2, 2)))
    torch.save(vae16.state_dict(), tmp_path / "vae16.pth")
    fails(capsys, ["sample", "--var-ckpt", checkpoints[0], "--vae-ckpt", str(tmp_path / "vae16.pth"), "--labels", "1",
                   "--out", str(tmp_path / "x.png")], f"--var-ckpt {checkpoints[0]} with --vae-ckpt", "word_embed")


def test_a_pair_of_models_with_other_schedules_in_python():
    _, var = tiny_vae_var((1, 2, 4))
    other, _ = tiny_vae_var((1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"the VQVAE's schedule \(1, 2, 3, 4\) differs from the VAR's \(1, 2, 4\)"):
        Sampler(var, other)


# ---------------------------------------------------------------------------------------------- Sampler's models
def test_a_module_that_is_not_a_var():
    vae, var = tiny_vae_var((1, 2, 4))
    with pytest.raises(TypeError, match=r"^var must be a VAR model \(fastvar.VAR or an official VAR patched by "
                                        r"fastvar.patch\) or an Infinity \(fastvar's, or an official one that "
                                        r"fastvar.patch swapped entirely\), got Linear$"):
        Sampler(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"got VQVAE: that is the VQVAE; the transformer comes first"):
        Sampler(vae, var)
    with pytest.raises(TypeError, match=r"^vae must be a VQVAE .* got Linear$"):
        Sampler(var, torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------- siblings
def test_special_files_are_not_replaced(capsys, checkpoints, no_sampling):
    """The picture is renamed into place: /dev/null would be replaced by a regular file."""
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null here")
    fails(capsys, sample_args(checkpoints, "/dev/null"), "--out must be a regular file path, got a special file")
    assert not os.path.isfile("/dev/null")


def test_a_training_checkpoint_of_another_layout_says_where_the_weights_are(tmp_path, capsys, checkpoints):
    sd = torch.load(checkpoints[0], weights_only=True)
    torch.save({"epoch": 3, "trainer": {"var_wo_ddp": sd}}, tmp_path / "ar-ckpt-last.pth")
    fails(capsys, ["sample", "--var-ckpt", str(tmp_path / "ar-ckpt-last.pth"), "--vae-ckpt", checkpoints[1],
                   "--labels", "1", "--out", str(tmp_path / "x.png")],
          "must hold a state dict", "it holds state dicts under 'trainer'.'var_wo_ddp'")


@pytest.mark.parametrize("more,message", [
    (["--top-k", "65"], "--top-k: top_k must be <= the vocabulary size V=64, got 65"),
    (["--top-k", "-1"], "--top-k: top_k must be >= 0"),
    (["--cfg", "inf"], "--cfg: cfg must be finite"),
    (["--cfg", "nan"], "--cfg: cfg must be finite"),
    (["--top-p", "-0.5"], "--top-p: top_p must be in [0.0, 1.0]"),
])
def test_settings_errors_name_the_option(capsys, no_sampling, sampling_args, more, message):
    argv = sampling_args()
    argv.remove("--top-k"), argv.remove("5")
    fails(capsys, argv + more, message)


def test_float16_on_cpu_names_dtype(capsys, no_sampling, sampling_args):
    fails(capsys, cpu_args(sampling_args("--dtype", "float16")), "--dtype: dtype must be one of")


def test_loader_device_and_dtype(checkpoints):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            fastvar.load_vae_var(*checkpoints, device="cuda")
    with pytest.raises(ValueError, match=r"dtype must be a floating-point dtype \(torch.float32, .*\), got torch.int64"):
        fastvar.load_vae_var(*checkpoints, dtype=torch.int64)


def test_ctrl_c_is_one_line_and_status_130(tmp_path, capsys, checkpoints, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(Sampler, "stream", interrupted)
    assert main(sample_args(checkpoints, tmp_path / "x.png")) == 130
    assert capsys.readouterr().err == "fastvar sample: interrupted\n"
    assert not list(tmp_path.iterdir())
