"""fastvar.load_infinity on Hugging Face sharded checkpoints (an index and its shards, ``.bin`` or ``.safetensors``,
as the official Infinity-8B is released) and in a chosen weights dtype, from the golden Infinity model's weights:
the same model as from one file, bf16 weights taken over without copies, every disagreement between an index and
its shards named, and ``fastvar generate --infinity-ckpt FOLDER``."""
import importlib
import json
import os
import shutil
import sys
import weakref

import numpy as np
import pytest
import torch

import golden_infinity as golden
from fastvar.cli import main
from fastvar.models import infinity_from_state_dicts, load_infinity
from fastvar.utils.files import load_sharded_tensors
from test_infinity_models import tiny_pair

NAME = golden.FILES[0]                  # infinity_d2_sq16.pt: C = 256, depth 2 in 2 chunks, d = 16
N_SHARDS = 3


@pytest.fixture(scope="module")
def weights():
    """The golden state dicts (stored in float16) in float32: cast once here, not on every load (the float16
    casts took 0.6 s of each 0.7 s load on the 2-core dev machine)."""
    g = golden.load(NAME)               # shared and cached: never modified here
    return tuple({k: v.float() if v.is_floating_point() else v for k, v in g[n].items()}
                 for n in ("infinity_state_dict", "vae_state_dict"))


@pytest.fixture(scope="module")
def single(weights, tmp_path_factory):
    """The golden weights as official single files, and the models load_infinity makes of them."""
    d = tmp_path_factory.mktemp("single")
    inf, vae = weights
    torch.save(inf, d / "infinity.pth")
    torch.save({"vae": vae}, d / "vae.pth")
    v, m = load_infinity(d / "infinity.pth", d / "vae.pth")
    return d, v, m


def _need_safetensors():
    try:
        importlib.import_module("safetensors.torch")
    except ImportError:
        pytest.skip("safetensors is not installed: the .safetensors shard case is untested (pip install safetensors)")


def write_sharded(folder, sd, kind="bin", n=N_SHARDS):
    """``sd`` split over ``n`` shards of unequal size (in its key order) with a Hugging Face index, as
    ``save_pretrained`` writes them. Returns ``(index path, shard paths)``."""
    os.makedirs(folder, exist_ok=True)
    names = list(sd)
    cuts = [0] + [len(names) * (i + 1) // (n + 1) + i for i in range(n - 1)] + [len(names)]
    ext = "bin" if kind == "bin" else "safetensors"
    stem = "pytorch_model" if kind == "bin" else "model"
    weight_map, paths = {}, []
    for i in range(n):
        fname = f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}"
        part = {k: sd[k] for k in names[cuts[i]:cuts[i + 1]]}
        assert part, "every shard holds a tensor"
        path = os.path.join(folder, fname)
        if kind == "bin":
            torch.save(part, path)
        else:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in part.items()}, path)
        weight_map.update((k, fname) for k in part)
        paths.append(path)
    index = os.path.join(folder, f"{stem}.{ext}.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                   "weight_map": weight_map}, f, indent=2)
    return index, paths


def assert_same_state_dict(got, want, cast=None):
    assert list(got) == list(want)
    for k, w in want.items():
        w = w.to(cast) if cast is not None and w.is_floating_point() else w
        assert got[k].dtype == w.dtype and torch.equal(got[k], w), k


# ------------------------------------------------------------------------------------------ sharded == one file
@pytest.mark.parametrize("kind", ["bin", "safetensors"])
@pytest.mark.parametrize("pass_index", [False, True], ids=["folder", "index"])
def test_sharded_checkpoint_loads_the_single_file_model(tmp_path, weights, single, kind, pass_index):
    if kind == "safetensors":
        _need_safetensors()
    d, v1, m1 = single
    index, _ = write_sharded(tmp_path / "infinity_weights", weights[0], kind)
    v2, m2 = load_infinity(index if pass_index else tmp_path / "infinity_weights", d / "vae.pth")
    assert_same_state_dict(m2.state_dict(), m1.state_dict())
    assert_same_state_dict(v2.state_dict(), v1.state_dict())
    assert {t.dtype for t in m2.state_dict().values()} == {torch.float32}
    assert m2.depth == m1.depth == 2 and m2.num_block_chunks == 2 and m2.C == 256


def test_sharded_vae_checkpoint(tmp_path, weights, single):
    """The VAE may be sharded too (a plain state dict across the shards)."""
    d, v1, m1 = single
    write_sharded(tmp_path / "vae", weights[1], "bin", n=2)
    v2, m2 = load_infinity(d / "infinity.pth", tmp_path / "vae")
    assert_same_state_dict(v2.state_dict(), v1.state_dict())


# ------------------------------------------------------------------------------------------ dtype
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_casts_the_transformer_and_keeps_the_vae_float32(tmp_path, weights, single, dtype):
    d, v1, m1 = single
    write_sharded(tmp_path / "w", weights[0])
    v2, m2 = load_infinity(tmp_path / "w", d / "vae.pth", dtype=dtype)
    assert_same_state_dict(m2.state_dict(), m1.state_dict(), cast=dtype)
    assert {p.dtype for p in m2.parameters()} == {dtype}
    assert_same_state_dict(v2.state_dict(), v1.state_dict())
    assert {p.dtype for p in v2.parameters()} == {torch.float32}
    v3, m3 = load_infinity(d / "infinity.pth", d / "vae.pth", dtype=dtype)     # one file: the same
    assert_same_state_dict(m3.state_dict(), m2.state_dict())
    _, m4 = infinity_from_state_dicts(*weights, dtype=dtype)
    assert_same_state_dict(m4.state_dict(), m2.state_dict())
    _, m5 = infinity_from_state_dicts(m2.state_dict(), v2.state_dict(), dtype=dtype)   # round trip
    assert_same_state_dict(m5.state_dict(), m2.state_dict())


def test_matching_dtype_takes_the_tensors_over(weights):
    """A bf16 state dict loaded with dtype=bf16 becomes the model's own tensors: no float32 copy, no bf16 copy."""
    inf = {k: v.to(torch.bfloat16) for k, v in weights[0].items()}
    _, m = infinity_from_state_dicts(inf, weights[1], dtype=torch.bfloat16)
    own = m.state_dict()
    assert all(own[k].data_ptr() == v.data_ptr() for k, v in inf.items())


def _record_loads(monkeypatch, keep: bool):
    """The tensors of every shard ``torch.load`` reads, by shard file name (``keep``: the tensors themselves, so
    their memory cannot be reused; else weak references), and whether, as each shard was read, every tensor of
    the earlier shards was already freed."""
    real = torch.load
    seen, freed_before = {}, []

    def load(path, *a, **kw):
        shard = os.path.basename(os.fspath(path)).startswith("pytorch_model-")
        if shard:
            freed_before.append(all(r() is None for refs in seen.values() for r in refs.values()))
        obj = real(path, *a, **kw)
        if shard:
            seen[os.path.basename(path)] = {k: (lambda v=v: v) if keep else weakref.ref(v) for k, v in obj.items()}
        return obj
    monkeypatch.setattr(torch, "load", load)
    return seen, freed_before


def test_bf16_shards_become_the_models_tensors(tmp_path, monkeypatch, weights, single):
    """dtype=bf16 on a bf16 checkpoint: every transformer tensor of the model is the memory its shard was read
    into (a 16.7 GB 8B checkpoint costs 16.7 GB)."""
    d = single[0]
    write_sharded(tmp_path / "w", {k: v.to(torch.bfloat16) for k, v in weights[0].items()})
    seen, _ = _record_loads(monkeypatch, keep=True)
    _, m = load_infinity(tmp_path / "w", d / "vae.pth", dtype=torch.bfloat16)
    read = {k: r() for refs in seen.values() for k, r in refs.items()}
    assert len(seen) == N_SHARDS and set(read) == set(weights[0])
    own = m.state_dict()
    assert all(own[k].data_ptr() == t.data_ptr() for k, t in read.items())


def test_cast_frees_each_shard_before_the_next_is_read(tmp_path, monkeypatch, weights, single):
    """float32 shards loaded as bf16: each shard's tensors are cast as it is merged, so the checkpoint's dtype is
    never held for more than one shard (the 8B's float32 shards would otherwise need 33.5 GB besides the bf16
    16.7 GB)."""
    d = single[0]
    write_sharded(tmp_path / "w", weights[0])
    seen, freed_before = _record_loads(monkeypatch, keep=False)
    load_infinity(tmp_path / "w", d / "vae.pth", dtype=torch.bfloat16)
    assert len(seen) == N_SHARDS and freed_before == [True] * N_SHARDS


@pytest.mark.parametrize("dtype, error, match", [
    (torch.int8, ValueError, r"dtype must be a floating-point dtype \(torch\.float32, .*\), got torch\.int8"),
    (torch.complex64, ValueError, r"dtype must be a floating-point dtype .*got torch\.complex64"),
    (torch.float8_e4m3fn, ValueError, r"dtype must be a floating-point dtype .*got torch\.float8_e4m3fn"),
    ("bfloat16", TypeError, r"dtype must be a torch\.dtype .*got str 'bfloat16'"),
])
def test_bad_dtype(tmp_path, weights, dtype, error, match):
    with pytest.raises(error, match=match):       # before any file is read: these do not exist
        load_infinity(tmp_path / "missing.pth", tmp_path / "missing_vae.pth", dtype=dtype)
    with pytest.raises(error, match=match):
        infinity_from_state_dicts(*weights, dtype=dtype)


def _file_mappings(path):
    """``(start, end)`` of every mapping of ``path`` into this process (``/proc/self/maps``)."""
    path = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        rows = [line.split(maxsplit=5) for line in f]
    return [tuple(int(x, 16) for x in r[0].split("-")) for r in rows if len(r) == 6 and r[5].strip() == path]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_single_file_is_mapped_and_cast_without_a_float32_copy(monkeypatch, weights, single, dtype):
    """One checkpoint file is mapped (torch.load(mmap=True)), not read: the float32 tensors torch.load returns are
    pages of the file, so casting them to bf16 one by one never holds an anonymous float32 copy (a float32 2B
    file would otherwise be in memory whole besides its bf16 model). After the load the file is no longer mapped:
    the model holds no page of it (a file rewritten in place under a mapping kills the process with SIGBUS)."""
    d = single[0]
    path = str(d / "infinity.pth")
    real, seen = torch.load, []

    def load(f, *a, **kw):
        obj = real(f, *a, **kw)
        if os.fspath(f) == path:        # where its tensors lie, as returned (no reference kept)
            ranges = _file_mappings(path)
            seen.append([any(lo <= t.data_ptr() < hi for lo, hi in ranges) for t in obj.values()
                         if t.is_floating_point()])
        return obj
    monkeypatch.setattr(torch, "load", load)
    _, m = load_infinity(path, d / "vae.pth", dtype=dtype)
    assert len(seen) == 1 and seen[0] and all(seen[0]), "the checkpoint's tensors were read into memory, not mapped"
    assert _file_mappings(path) == [], "the model still holds pages of the checkpoint file"
    assert_same_state_dict(m.state_dict(), single[2].state_dict(), cast=dtype)


def test_legacy_pickle_checkpoint_loads(tmp_path, weights, single):
    """A file of torch.save's pre-1.6 format cannot be mapped: it is read, to the same model."""
    torch.save(weights[0], tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    torch.save({"vae": weights[1]}, tmp_path / "legacy_vae.pth", _use_new_zipfile_serialization=False)
    with open(tmp_path / "legacy.pth", "rb") as f:
        assert not f.read(4).startswith(b"PK")
    v, m = load_infinity(tmp_path / "legacy.pth", tmp_path / "legacy_vae.pth", dtype=torch.bfloat16)
    assert_same_state_dict(m.state_dict(), single[2].state_dict(), cast=torch.bfloat16)
    assert_same_state_dict(v.state_dict(), single[1].state_dict())


# ------------------------------------------------------------------------------------------ index and shards disagree
def _small():
    g = torch.Generator().manual_seed(0)
    return {f"blocks.{i}.w": torch.randn(3 + i, 2, generator=g) for i in range(9)}


def _rewrite_shard(path, change):
    sd = torch.load(path, weights_only=True)
    change(sd)
    torch.save(sd, path)


def _edit_index(index, change):
    with open(index) as f:
        obj = json.load(f)
    change(obj)
    with open(index, "w") as f:
        json.dump(obj, f)


def _no_index(index, paths):
    os.remove(index)


def _two_indexes(index, paths):
    shutil.copy(index, os.path.join(os.path.dirname(index), "model.safetensors.index.json"))


def _missing_shard(index, paths):
    os.remove(paths[1])


def _shard_lacks_a_key(index, paths):
    _rewrite_shard(paths[1], lambda sd: sd.pop(sorted(sd)[0]))


def _unlisted_key(index, paths):
    _rewrite_shard(paths[2], lambda sd: sd.update({"extra.weight": torch.ones(2)}))


def _key_in_two_shards(index, paths):
    first = torch.load(paths[0], weights_only=True)
    _rewrite_shard(paths[2], lambda sd: sd.update({"blocks.0.w": first["blocks.0.w"]}))


def _index_puts_key_elsewhere(index, paths):
    _edit_index(index, lambda obj: obj["weight_map"].update({"blocks.0.w": os.path.basename(paths[2])}))


def _not_json(index, paths):
    with open(index, "w") as f:
        f.write('{"weight_map": {"blocks.0.w": ')


def _no_weight_map(index, paths):
    _edit_index(index, lambda obj: obj.pop("weight_map"))


def _empty_weight_map(index, paths):
    _edit_index(index, lambda obj: obj.update(weight_map={}))


def _absolute_shard_name(index, paths):
    _edit_index(index, lambda obj: obj["weight_map"].update({"blocks.0.w": paths[0]}))


def _shard_not_a_state_dict(index, paths):
    torch.save([torch.ones(2)], paths[0])


def _shard_not_a_checkpoint(index, paths):
    with open(paths[0], "w") as f:
        f.write("not a checkpoint")


SHARD = r"pytorch_model-0000{}-of-00003\.bin"
INDEX = r"pytorch_model\.bin\.index\.json"


@pytest.mark.parametrize("break_it, error, match", [
    (_no_index, FileNotFoundError, r"Infinity checkpoint .*/w is a folder without a shard index \(expected one "
                                   r"\*\.index\.json file.*it holds: " + SHARD.format(1) + ", " + SHARD.format(2)),
    (_two_indexes, ValueError, r"Infinity checkpoint .*/w holds 2 shard indexes \(model\.safetensors\.index\.json, "
                               + INDEX + r"\), expected one: pass the index file"),
    (_missing_shard, FileNotFoundError, r"Infinity checkpoint: shard .*/w/" + SHARD.format(2) + r" not found \(the "
                                        r"index .*" + INDEX + r" puts 3 tensors there; 1 of its 3 shards"),
    (_shard_lacks_a_key, ValueError, r"shard .*" + SHARD.format(2) + " does not hold 1 tensors the index .*" + INDEX
                                     + r" puts there: blocks\.2\.w$"),
    (_unlisted_key, ValueError, r"shard .*" + SHARD.format(3) + " holds 1 tensors the index .* does not list: "
                                r"extra\.weight$"),
    (_key_in_two_shards, ValueError, r"tensor 'blocks\.0\.w' is in two shards, .*" + SHARD.format(1) + " and .*"
                                     + SHARD.format(3) + r" \(1 such: blocks\.0\.w\); the index .* puts it in "
                                     + SHARD.format(1)),
    (_index_puts_key_elsewhere, ValueError, r"shard .*" + SHARD.format(1) + " holds 1 tensors the index .* puts in "
                                            r"other shards: blocks\.0\.w \(in " + SHARD.format(3) + r"\)"),
    (_not_json, ValueError, r"shard index .*" + INDEX + r" is not JSON \(.*\); expected the Hugging Face layout"),
    (_no_weight_map, ValueError, r"shard index .*" + INDEX + r" has no weight_map \(got keys \['metadata'\]\)"),
    (_empty_weight_map, ValueError, r"has no weight_map \(got a weight_map that is empty\)"),
    (_absolute_shard_name, ValueError, r"the weight_map must give each tensor a shard file name relative to the "
                                       r"index's folder; 'blocks\.0\.w' has '/"),
    (_shard_not_a_state_dict, ValueError, r"shard .*" + SHARD.format(1) + r" must hold a flat state dict \(names -> "
                                          r"tensors\), got list"),
    (_shard_not_a_checkpoint, ValueError, r"Infinity checkpoint shard .*" + SHARD.format(1) + " is not a checkpoint "
                                          r"written by torch\.save"),
])
def test_index_and_shards_must_agree(tmp_path, single, break_it, error, match):
    index, paths = write_sharded(tmp_path / "w", _small())
    assert load_sharded_tensors(index, "x").keys() == _small().keys()      # whole, it reads
    break_it(index, paths)
    with pytest.raises(error, match=match):
        load_infinity(tmp_path / "w", single[0] / "vae.pth")


def test_missing_paths(tmp_path, single):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"Infinity checkpoint .*/empty is a folder without a shard index .*"
                                                r"it holds: nothing"):
        load_infinity(tmp_path / "empty", single[0] / "vae.pth")
    with pytest.raises(FileNotFoundError, match=r"Infinity checkpoint shard index not found: .*/nowhere\.index\.json"):
        load_infinity(tmp_path / "nowhere.index.json", single[0] / "vae.pth")


def test_safetensors_shards_without_the_package(tmp_path, monkeypatch, single):
    """Without safetensors installed, .safetensors shards are an error saying how to install it (the shard file is
    not even opened: this runs with or without the package)."""
    os.makedirs(tmp_path / "w")
    (tmp_path / "w" / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 16)
    with open(tmp_path / "w" / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": {"a": "model-00001-of-00001.safetensors"}}, f)
    monkeypatch.setitem(sys.modules, "safetensors", None)          # import safetensors -> ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"shard .*model-00001-of-00001\.safetensors is a \.safetensors file: "
                                          r"reading it needs the safetensors package \(pip install safetensors\)"):
        load_infinity(tmp_path / "w", single[0] / "vae.pth")


def test_corrupt_safetensors_shard(tmp_path, single):
    _need_safetensors()
    index, paths = write_sharded(tmp_path / "w", _small(), "safetensors")
    with open(paths[1], "wb") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"shard .*model-00002-of-00003\.safetensors could not be read with "
                                         r"safetensors: "):
        load_infinity(tmp_path / "w", single[0] / "vae.pth")


# ------------------------------------------------------------------------------------------ fastvar generate
def test_generate_reads_a_sharded_folder(tmp_path):
    """``fastvar generate --infinity-ckpt FOLDER`` runs (it calls load_infinity, whose sharded model is the single
    file's: tested above); the manifest's size of the checkpoint is its index's and shards' (a folder's own size
    would not change with its weights). A tiny random model: its sampling costs 2/3 of the golden one's."""
    vae, model = tiny_pair(seed=2)
    index, paths = write_sharded(tmp_path / "w", model.state_dict())
    torch.save({"vae": vae.state_dict()}, tmp_path / "vae.pth")
    g = torch.Generator().manual_seed(5)
    torch.save([torch.randn(6, model.Ct5, generator=g)], tmp_path / "prompts.pt")
    out = tmp_path / "out"
    assert main(["generate", "--out-dir", str(out), "--num-per-class", "1", "--classes", "0", "--infinity-ckpt",
                 str(tmp_path / "w"), "--vae-ckpt", str(tmp_path / "vae.pth"), "--prompts", str(tmp_path / "prompts.pt"),
                 "--pn", "0.06M", "--cfg", "2", "--top-p", "0.9", "--quiet"]) == 0
    with np.load(out / "samples.npz") as z:
        images = z["arr_0"].copy()
    with open(out / "manifest.json") as f:
        identity = json.load(f)["model"]
    assert images.shape == (1, 256, 256, 3) and images.dtype == np.uint8 and images.std() > 10
    assert identity["infinity_ckpt"] == str(tmp_path / "w")
    assert identity["infinity_bytes"] == sum(os.path.getsize(p) for p in [index, *paths])
