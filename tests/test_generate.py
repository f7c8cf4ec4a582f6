"""``fastvar generate``: the same samples.npz whatever the world size, the batch size or interruptions (CPU, gloo,
the bundled digits model, whose small VQVAE decodes to the same pixels at any batch size and thread count; a larger
one may move a pixel by one uint8 level: test_sampler's image_seeds test); restarts with other settings and bad
arguments get one-line errors."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from fastvar.cli import main
from fastvar.generate import done_ranges, image_seed, todo_batches

CLASSES = "0,3,7"
PER_CLASS = 4          # 12 images: batch sizes 3 and 16 cut them differently, 5 leaves a batch of 2
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _generate(out, *extra):
    return main(["generate", "--out-dir", str(out), "--num-per-class", str(PER_CLASS), "--classes", CLASSES,
                 "--quiet", *extra])


def _torchrun(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _samples(out):
    with np.load(os.path.join(out, "samples.npz")) as z:
        return z["arr_0"].copy(), z["labels"].copy()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batch size 5."""
    out = tmp_path_factory.mktemp("ref")
    assert _generate(out, "--batch-size", "5") == 0
    return _samples(out)


def test_output_layout_and_manifest(reference, tmp_path):
    images, labels = reference
    assert images.dtype == np.uint8 and images.shape == (12, 16, 16, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [0] * 4 + [3] * 4 + [7] * 4     # class-major
    assert len({images[i].tobytes() for i in range(12)}) == 12, "every image has its own random numbers"
    assert _generate(tmp_path, "--batch-size", "16") == 0
    manifest = json.load(open(tmp_path / "manifest.json"))
    assert manifest["classes"] == [0, 3, 7] and manifest["num_per_class"] == 4 and manifest["seed"] == 0
    assert manifest["model"]["bundled"] == "digits" and manifest["image_hw"] == [16, 16]
    assert os.path.getsize(tmp_path / "grid.png") > 100


@pytest.mark.parametrize("batch_size", ["3", "16", "1"])
def test_same_images_at_any_batch_size(reference, tmp_path, batch_size):
    assert _generate(tmp_path, "--batch-size", batch_size) == 0
    images, labels = _samples(tmp_path)
    assert np.array_equal(images, reference[0]) and np.array_equal(labels, reference[1])


@pytest.mark.slow
def test_same_images_on_two_processes(reference, tmp_path):
    proc = _torchrun("--standalone", "--nproc_per_node", "2", "-m", "fastvar", "generate", "--out-dir", str(tmp_path),
                     "--num-per-class", str(PER_CLASS), "--classes", CLASSES, "--batch-size", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 12 images" in proc.stdout
    images, labels = _samples(tmp_path)
    assert np.array_equal(images, reference[0]) and np.array_equal(labels, reference[1])


@pytest.mark.slow
def test_same_images_on_two_machines(reference, tmp_path):
    """Two torchrun agents (``--nnodes 2``) meeting through a c10d rendezvous on localhost."""
    port = _free_port()
    common = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
              "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"fastvar-test-{port}"]
    cmd = ["-m", "fastvar", "generate", "--out-dir", str(tmp_path), "--num-per-class", str(PER_CLASS),
           "--classes", CLASSES, "--batch-size", "3", "--quiet"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *common, "--node_rank", str(r), *cmd],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), [o[1][-2000:] for o in outs]
    images, labels = _samples(tmp_path)
    assert np.array_equal(images, reference[0]) and np.array_equal(labels, reference[1])


# run by torchrun in place of ``-m fastvar``: global rank 1 raises at its first batch
FAIL_RANK_1 = """import os, sys
from fastvar.cli import main
from fastvar.sampler import Sampler


def fail(*args, **kwargs):
    raise RuntimeError("injected failure")


if os.environ["RANK"] == "1":
    Sampler.sample = fail
sys.exit(main())
"""


@pytest.mark.slow
def test_a_failed_rank_stops_the_others_before_their_next_batch(tmp_path):
    """Two torchrun agents, as on two machines: torchrun does not stop rank 0 when rank 1, on the other agent,
    fails (it would on one agent); rank 0 must stop before its next batch with one line naming rank 1, not sample
    its 50 batches first."""
    script = tmp_path / "fail_rank1.py"
    script.write_text(FAIL_RANK_1)
    out = tmp_path / "out"
    port = _free_port()
    common = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
              "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"fastvar-test-{port}"]
    cmd = [str(script), "generate", "--out-dir", str(out), "--num-per-class", "20", "--classes", "all",
           "--batch-size", "2", "--quiet", "--timeout", "60"]                     # 100 batches, 50 per rank
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *common, *cmd], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in (0, 1)]
    errs = "\n".join(p.communicate(timeout=300)[1] for p in nodes)
    assert all(p.returncode != 0 for p in nodes)
    assert "RuntimeError: injected failure" in errs, errs[-3000:]
    stop = re.findall(r"^fastvar generate: error: rank 0: .*$", errs, re.M)
    assert len(stop) == 1 and "rank 1 failed (RuntimeError: injected failure)" in stop[0], errs[-3000:]
    written = len(done_ranges(str(out / "shards")))
    assert written <= 10, f"rank 0 wrote {written} of its 50 shards after rank 1 failed"


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_samples(tmp_path):
    """``kill -9`` in the middle, then the same command (here with another batch size and two processes):
    nothing lost, nothing repeated, the same samples.npz as one uninterrupted run."""
    ref_dir, out = tmp_path / "ref", tmp_path / "run"
    args = ["--num-per-class", "6", "--classes", "all"]             # 60 images
    assert main(["generate", "--out-dir", str(ref_dir), "--batch-size", "16", "--quiet", *args]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "fastvar", "generate", "--out-dir", str(out), "--batch-size", "2",
                             "--quiet", *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    shards = out / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if shards.is_dir() and len([f for f in os.listdir(shards) if f.endswith(".npz")]) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sum(e - b for b, e in done_ranges(str(shards)))
    assert 0 < done < 60, f"the kill should land mid-run ({done} of 60 images were done)"
    assert not (out / "samples.npz").exists()
    resumed = _torchrun("--standalone", "--nproc_per_node", "2", "-m", "fastvar", "generate", "--out-dir", str(out),
                        "--batch-size", "7", "--quiet", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"sampled {60 - done} of them" in resumed.stdout, resumed.stdout
    a, b = _samples(ref_dir), _samples(out)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_restart_with_other_settings_names_what_differs(tmp_path, capsys):
    assert _generate(tmp_path, "--batch-size", "16") == 0
    assert _generate(tmp_path, "--batch-size", "16", "--seed", "1", "--cfg", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed: 0 before, 1 now" in err[0] and "cfg: 2.0 before, 3.0 now" in err[0], err
    assert _generate(tmp_path, "--batch-size", "3") == 0, "the batch size does not change the images"


@pytest.mark.parametrize("extra,match", [
    (["--classes", "0,10"], r"--classes: class 10 is out of range; this model has classes 0..9"),
    (["--classes", "1,1"], r"--classes: class 1 is listed twice"),
    (["--num-per-class", "0"], r"--num-per-class must be >= 1, got 0"),
    (["--batch-size", "0"], r"--batch-size must be >= 1, got 0"),
    (["--seed", str(2 ** 63)], r"--seed must be an int in \[0, 2\*\*63\), got 9223372036854775808: image i of "
                               r"class c uses the seed SHA-256\(seed, c, i\)"),
    (["--seed", "-1"], r"--seed must be an int in \[0, 2\*\*63\), got -1: "),
    (["--top-k", "-1"], r"^fastvar generate: error: --top-k: top_k must be >= 0"),
    (["--cfg", "nan"], r"^fastvar generate: error: --cfg: cfg must be finite"),
])
def test_bad_arguments(tmp_path, capsys, extra, match):
    assert main(["generate", "--out-dir", str(tmp_path / "o"), "--num-per-class", "2", "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err
    assert not (tmp_path / "o" / "samples.npz").exists()


def test_out_dir_not_writable(tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert _generate(blocked) == 2
    assert "--out-dir" in capsys.readouterr().err
    if os.geteuid() != 0:       # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert _generate(ro / "o") == 2


def test_help_gives_the_defaults_of_both_families():
    """VAR checkpoints and Infinity have other defaults: the help gives both, as the code defines them."""
    from fastvar.cli import build_parser
    from fastvar.sampler.infinity import DEFAULTS
    from fastvar.settings import RELEASED_SETTINGS
    subparsers = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    helps = {a.option_strings[0]: a.help for a in subparsers.choices["generate"]._actions if a.option_strings}
    for name in ("cfg", "top_k", "top_p"):
        text = helps["--" + name.replace("_", "-")]
        assert f"{RELEASED_SETTINGS[name]} for VAR checkpoints" in text, text
        assert f"{DEFAULTS[name]} with --infinity-ckpt" in text, text
    assert f"default: {DEFAULTS['tau']}" in helps["--tau"]


def test_image_seed_is_stable_and_spread():
    assert image_seed(0, 3, 1) == image_seed(0, 3, 1) and 0 <= image_seed(0, 3, 1) < 2 ** 63
    seeds = {image_seed(s, c, i) for s in range(3) for c in range(10) for i in range(10)}
    assert len(seeds) == 300


def test_todo_batches_skip_finished_ranges():
    assert todo_batches(10, [(2, 5)], 3) == [(0, 2), (5, 8), (8, 10)]
    assert todo_batches(4, [(0, 4)], 3) == []
