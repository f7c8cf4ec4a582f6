"""``fastvar generate`` for Infinity (prompts as precomputed text features in a file): the layout of samples.npz,
the same images at any batch size and the Sampler's own images, restarts with other settings, bad arguments (CPU,
a tiny random Infinity saved as official checkpoint files)."""
import json
import os
import re

import numpy as np
import pytest
import torch

from fastvar.cli import main
from fastvar.generate import image_seed
from test_infinity_models import tiny_pair

PER_PROMPT = 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inf")
    vae, model = tiny_pair(seed=2)
    torch.save(model.state_dict(), d / "infinity.pth")
    torch.save({"vae": vae.state_dict()}, d / "vae.pth")
    g = torch.Generator().manual_seed(5)
    feats = [torch.randn(n, model.Ct5, generator=g) for n in (4, 7, 2)]
    torch.save(feats, d / "prompts.pt")
    torch.save({"features": [torch.randn(3, 64)]}, d / "wrong_width.pt")
    return d, feats


def _generate(files, out, *extra):
    d, _ = files
    return main(["generate", "--out-dir", str(out), "--num-per-class", str(PER_PROMPT), "--classes", "0,2",
                 "--infinity-ckpt", str(d / "infinity.pth"), "--vae-ckpt", str(d / "vae.pth"),
                 "--prompts", str(d / "prompts.pt"), "--pn", "0.06M", "--h-div-w", "0.5", "--cfg", "2",
                 "--top-p", "0.9", "--quiet", *extra])


def _samples(out):
    with np.load(os.path.join(out, "samples.npz")) as z:
        return z["arr_0"].copy(), z["labels"].copy()


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    assert _generate(files, out, "--batch-size", "3") == 0
    return out, _samples(out)


def test_layout_manifest_and_the_samplers_images(files, reference):
    out, (images, labels) = reference
    assert images.dtype == np.uint8 and images.shape == (4, 176, 352, 3)       # h/w 0.5 at 0.06M: 11 x 22 tokens
    assert labels.tolist() == [0, 0, 2, 2]                                   # prompt-major
    assert len({images[i].tobytes() for i in range(4)}) == 4
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["classes"] == [0, 2] and manifest["prompts"]["count"] == 3 and manifest["tau"] == [0.5] * 7
    assert manifest["cfg"] == [2.0] * 7 and manifest["scale_schedule"][-1] == [1, 11, 22]
    assert manifest["model"]["infinity_bytes"] > 0 and len(manifest["prompts"]["sha256"]) == 64
    # image 1 of prompt 2 is what the Sampler makes of that prompt with its image seed
    from fastvar import dynamic_resolution as S
    from fastvar.models import load_infinity
    from fastvar.sampler import Sampler
    from fastvar.utils.images import to_uint8
    d, feats = files
    vae, model = load_infinity(d / "infinity.pth", d / "vae.pth")
    f = feats[2]
    text = (torch.cat((f, f)), [len(f)] * 2, torch.tensor([0, len(f), 2 * len(f)], dtype=torch.int32), len(f))
    img = Sampler(model, vae, dtype=torch.float32).sample(
        text, image_seeds=[image_seed(0, 2, 1)] * 2, scale_schedule=S.scale_schedule(0.5, "0.06M"), cfg=2.0,
        top_p=0.9)[:1]
    assert np.array_equal(to_uint8(img).numpy()[0], images[3])


def test_same_images_at_another_batch_size(files, reference, tmp_path):
    """The same bits and latent at any batch size; the BSQ VAE's CPU convolutions round by batch size (measured:
    5.5e-5 on a [0, 1] pixel), so a pixel may move by one uint8 level."""
    _, (images, labels) = reference
    assert _generate(files, tmp_path, "--batch-size", "1") == 0
    a, b = _samples(tmp_path)
    assert np.array_equal(b, labels) and np.abs(a.astype(int) - images.astype(int)).max() <= 1


def test_restart_with_other_settings_names_what_differs(files, reference, capsys):
    out, _ = reference
    assert _generate(files, out, "--tau", "0.7") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tau: [0.5, 0.5" in err[0] and "[0.7, 0.7" in err[0], err


@pytest.mark.parametrize("extra,match", [
    (["--classes", "0,3"], r"--classes: prompt 3 is out of range; this prompt file has prompts 0..2"),
    (["--prompts", "WRONG"], r"--prompts: prompt 0 must be a float \(len >= 1, C_t5=128\) tensor, got torch.float32 "
                             r"\(3, 64\)"),
    (["--prompts", "MISSING"], r"--prompts: .*missing.pt not found"),
    (["--pn", "2M"], r"pn must be one of"),
    (["--cfg-insertion-layer", "-9"], r"--cfg-insertion-layer: cfg_insertion_layer items must be 0, 1 or a negative "
                                      r"block offset"),
    (["--more-smooth"], r"--more-smooth is VAR's option"),
    (["--tau", "0"], r"^fastvar generate: error: --tau: tau must not hold 0"),
    (["--cfg", "nan"], r"^fastvar generate: error: --cfg: cfg\[0\] must be finite"),
    (["--top-p", "2"], r"^fastvar generate: error: --top-p: top_p must be in"),
    pytest.param(["--dtype", "float16"], r"^fastvar generate: error: --dtype: dtype must be one of",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="float16 runs on this machine's GPU")),
])
def test_bad_arguments(files, tmp_path, capsys, extra, match):
    d, _ = files
    extra = [str(d / "wrong_width.pt") if x == "WRONG" else str(d / "missing.pt") if x == "MISSING" else x
             for x in extra]
    assert _generate(files, tmp_path / "o", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err
    assert not (tmp_path / "o" / "samples.npz").exists()


def test_prompts_are_required(files, tmp_path, capsys):
    d, _ = files
    assert main(["generate", "--out-dir", str(tmp_path), "--num-per-class", "1", "--infinity-ckpt",
                 str(d / "infinity.pth"), "--vae-ckpt", str(d / "vae.pth"), "--quiet"]) == 2
    assert "--infinity-ckpt needs --prompts" in capsys.readouterr().err
