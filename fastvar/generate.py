"""``fastvar generate``: many images for evaluation (FID-50k: 50 per class of 1,000), on one process or many.

Runs as a plain process or unchanged under ``torchrun`` (one process per GPU, ``torch.distributed`` with NCCL on
GPUs and gloo on CPU, across machines with torchrun's rendezvous; the output folder must be one shared folder):

    fastvar generate --out-dir fid --num-per-class 50                      # bundled digits model, this process
    torchrun --nproc_per_node 8 -m fastvar generate --out-dir fid --num-per-class 50 \\
        --var-ckpt var_d16.pth --vae-ckpt vae_ch160v4096z32.pth --cfg 1.5 --top-k 900 --top-p 0.96
    fastvar generate --out-dir t2i --num-per-class 4 --infinity-ckpt infinity_2b_reg.pth \\
        --vae-ckpt infinity_vae_d32_reg.pth --prompts prompts.pt --cfg 3 --tau 0.5 --h-div-w 1.0 --pn 1M

Infinity (text-to-image): the prompts are precomputed text features (no text encoder is loaded), a ``.pt`` file
(``torch.load(weights_only=True)``) holding a list of ``(len_i, C_t5)`` float tensors, one per prompt (the T5
features of its tokens), or a dict with that list under ``"features"``; or a ``.safetensors`` file whose keys are
the prompt indices ``"0"``, ``"1"``, ... (needs the ``safetensors`` package). Prompts play the part of classes:
``--classes`` picks prompt indices, ``--num-per-class`` images are made of each, ``labels`` holds prompt indices.

What it guarantees:

- **The same images whatever the world size, the batch size or interruptions.** Image ``i`` of class ``c`` draws
  its random numbers from its own generator, seeded by :func:`image_seed` ``(seed, c, i)`` (``Sampler(...,
  image_seeds=...)``), so it does not depend on the batch or the process that samples it. On CPU in float32 its
  tokens (Infinity: bits) and latent are the same bit for bit, also across CPU thread counts (torchrun gives
  each process one thread; a batch of one image is sampled as two copies of it, because PyTorch's CPU
  convolutions choose their algorithm by memory layout, which differs at batch size 1). Its decoded pixels may
  move by one uint8 level: the VQVAE decoder's CPU convolutions round by batch size and thread count (measured
  on a [0, 1] pixel: 6.5e-6 for a VAR VQVAE at 1 and 3 threads, 5.5e-5 for Infinity's BSQ VAE at two batch
  sizes). On GPUs: as far as the kernels are deterministic (cuBLAS and cuDNN may pick other algorithms for other
  batch sizes, which moves the last bits of the latent, rarely a token). ``fastvar sample`` keeps the official
  batch-coupled random order.
- **Output:** ``DIR/samples.npz`` with ``arr_0`` uint8 ``(N, H, W, 3)`` (the layout the reference FID / IS
  evaluator reads) in class-major order and ``labels`` int64 ``(N,)``; ``DIR/manifest.json`` with the model,
  settings, seed, versions and commit; ``DIR/grid.png`` with a few images of each class.
- **Resumable:** every batch is written as its own shard (``DIR/shards/``, atomically: a file is whole or
  absent). A run killed at any moment, every rank at once included, continues where it stopped when started
  again with the same command (any world size or batch size), never losing or repeating an image, and ends with
  the same images (as above). A restart with other settings stops with an error naming what differs.
- **A failed rank stops the others.** A rank whose work raises an error (Ctrl-C included) records it in the run's
  ``torch.distributed`` store; every rank looks there before each batch (one store request) and stops, after the
  batch it is sampling, with one line naming the failed rank and its error. A rank killed outright (``kill -9``,
  the kernel's out-of-memory killer, a machine lost) records nothing: torchrun stops the other ranks on its
  machine; if it was rank 0, the store goes with its torchrun agent and the ranks elsewhere stop before their next
  batch; otherwise they stop at the end of their share, at the "all shards written" barrier, at once when the
  connection to the dead rank is seen closed (gloo) and after ``--timeout`` seconds at the latest (a rank that
  hangs too).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import time
import zipfile
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from fastvar.utils.user_error import UserError, check_seed_option

MANIFEST_FORMAT = "fastvar.generate/1"
SHARD = re.compile(r"^ids_(\d{9})_(\d{9})\.npz$")
# what makes the images: a restart must match these (world size, batch size and timeout may change)
IMAGE_KEYS = ("model", "classes", "num_per_class", "seed", "cfg", "top_k", "top_p", "more_smooth", "dtype")
INFINITY_IMAGE_KEYS = IMAGE_KEYS + ("tau", "cfg_insertion_layer", "scale_schedule", "prompts")
# the library's names that errors start with and that are this command's options (fastvar.cli.as_option_error)
OPTION_NAMES = ("cfg", "top_k", "top_p", "dtype", "tau", "cfg_insertion_layer")


def image_seed(seed: int, cls: int, index: int) -> int:
    """The seed of image ``index`` of class ``cls``, in ``[0, 2**63)``: SHA-256 of the three numbers, so that
    nearby triples give unrelated streams."""
    digest = hashlib.sha256(f"fastvar.generate:{seed}:{cls}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ------------------------------------------------------------------------------------------ plan
def parse_classes(text: str, num_classes: int, noun: str = "class", holder: str = "model") -> List[int]:
    """``"all"`` or comma-separated class ids (each once), checked against the model (Infinity: prompt indices,
    ``noun="prompt"``, checked against the prompt file)."""
    if text.strip().lower() == "all":
        return list(range(num_classes))
    out = []
    plural = "classes" if noun == "class" else noun + "s"
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            c = int(part)
        except ValueError:
            raise UserError(f"--classes must be 'all' or comma-separated {noun} ids, got {part!r} in {text!r}") from None
        if not 0 <= c < num_classes:
            raise UserError(f"--classes: {noun} {c} is out of range; this {holder} has {plural} 0..{num_classes - 1}")
        if c in out:
            raise UserError(f"--classes: {noun} {c} is listed twice")
        out.append(c)
    if not out:
        raise UserError(f"--classes must name at least one class, got {text!r}")
    return out


def done_ranges(shard_dir: str) -> List[Tuple[int, int]]:
    """``[begin, end)`` id ranges of the finished shards (only whole files carry the final name)."""
    if not os.path.isdir(shard_dir):
        return []
    return sorted((int(m.group(1)), int(m.group(2))) for m in map(SHARD.match, os.listdir(shard_dir)) if m)


def todo_batches(n: int, done: Sequence[Tuple[int, int]], batch_size: int) -> List[Tuple[int, int]]:
    """The ids in ``[0, n)`` no finished shard holds, as ``[begin, end)`` batches of at most ``batch_size``
    consecutive ids."""
    covered = np.zeros(n, dtype=bool)
    for b, e in done:
        covered[b:min(e, n)] = True
    out, i = [], 0
    while i < n:
        if covered[i]:
            i += 1
            continue
        j = i
        while j < n and not covered[j] and j - i < batch_size:
            j += 1
        out.append((i, j))
        i = j
    return out


# ------------------------------------------------------------------------------------ distributed
# the key of the run's first failure in the ranks' torch.distributed store: "<rank>\n<its error, one line>"
FAILED_KEY = "fastvar.generate/failed"
FAILURES_KEY = "fastvar.generate/failures"      # a counter: the first rank to fail writes FAILED_KEY


class OtherRankFailed(UserError):
    """This rank stopped because another one failed (not recorded as a failure of its own)."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Group:
    """This process's place among the ranks torchrun started (a single process without torchrun)."""

    def __init__(self, timeout_s: float):
        import torch.distributed as dist
        self.dist = dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.active = self.world > 1
        self.store = None
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        if self.active:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            # the env:// rendezvous init_process_group would make, kept: the ranks tell each other of a failure
            # through its store (under torchrun it is the run's, scoped to this restart of the workers)
            self.store, self.rank, self.world = next(dist.rendezvous("env://", timeout=self.timeout))
            self.store.set_timeout(self.timeout)
            dist.init_process_group(backend, store=self.store, rank=self.rank, world_size=self.world,
                                    timeout=self.timeout, **({"device_id": self.device} if backend == "nccl" else {}))

    def _failure(self):
        """``(rank, error)`` of the run's first failed rank, or None; raises if the store cannot be reached. One
        store request while no rank has failed."""
        if self.store is None or not self.store.check([FAILED_KEY]):
            return None
        rank, _, what = self.store.get(FAILED_KEY).decode(errors="replace").partition("\n")
        return rank, what

    def record_failure(self, error: BaseException) -> None:
        """Tell the other ranks that this one failed, with the first line of its error; only the run's first
        failure is kept, so the message names the rank that started it."""
        if self.store is None or isinstance(error, OtherRankFailed):
            return
        what = _first_line(error)
        if not isinstance(error, UserError) and what != type(error).__name__:
            what = f"{type(error).__name__}: {what}"
        try:
            if self.store.add(FAILURES_KEY, 1) == 1:
                self.store.set(FAILED_KEY, f"{self.rank}\n{what[:500]}")
        except Exception:       # the store is gone with the rank that hosted it: the others find that out too
            pass

    def stop_if_another_failed(self) -> None:
        """Between batches: stop with :class:`OtherRankFailed` if another rank recorded a failure, or if the
        run's store is gone (the rank or torchrun agent that hosted it died)."""
        try:
            failed = self._failure()
        except Exception as e:
            raise OtherRankFailed(f"rank {self.rank}: stopped: the run's torch.distributed store cannot be reached "
                                  f"(the process that hosted it, rank 0 or its torchrun agent, died?): "
                                  f"{_first_line(e)}") from None
        if failed is not None:
            raise OtherRankFailed(f"rank {self.rank}: stopped because rank {failed[0]} failed ({failed[1]})")

    def barrier(self, what: str) -> None:
        """Wait for every rank; a rank that died or hangs ends the wait after the timeout with an error."""
        if not self.active:
            return
        try:
            if self.dist.get_backend() == "gloo":
                self.dist.monitored_barrier(timeout=self.timeout)
            else:
                self.dist.barrier()
        except Exception as e:
            try:
                failed = self._failure()
            except Exception:
                failed = None
            if failed is not None:
                raise OtherRankFailed(f"rank {self.rank}: stopped at '{what}' because rank {failed[0]} failed "
                                      f"({failed[1]})") from None
            raise UserError(f"rank {self.rank}: the other ranks did not reach '{what}' within "
                                f"{self.timeout.total_seconds():.0f} s (a rank failed?): {e}") from None

    def close(self) -> None:
        if self.active and self.dist.is_initialized():
            self.dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ output
def _write_npz(path: str, arrays: Dict[str, np.ndarray]) -> None:
    from fastvar.utils.files import atomic_write

    def write(f):
        np.savez(f, **arrays)
    atomic_write(path, write)


def _save_shard(shard_dir: str, begin: int, end: int, images: np.ndarray, labels: np.ndarray) -> None:
    _write_npz(os.path.join(shard_dir, f"ids_{begin:09d}_{end:09d}.npz"), {"images": images, "labels": labels})


def assemble(out_dir: str, n: int) -> str:
    """Join the shards into ``samples.npz`` (``arr_0``, ``labels``) without holding every image in memory: the
    images go through a memory-mapped ``.npy`` into an uncompressed zip."""
    shard_dir = os.path.join(out_dir, "shards")
    ranges = done_ranges(shard_dir)
    covered = np.zeros(n, dtype=np.int64)
    for b, e in ranges:
        covered[b:e] += 1
    if (covered == 0).any():
        missing = np.flatnonzero(covered == 0)
        raise UserError(f"{out_dir}: {len(missing)} images have no shard (first id {missing[0]}); run again")
    tmp_npy = os.path.join(out_dir, f".arr_0.{os.getpid()}.npy")
    images = labels = None
    try:
        taken = np.zeros(n, dtype=bool)
        for b, e in ranges:
            with np.load(os.path.join(shard_dir, f"ids_{b:09d}_{e:09d}.npz")) as z:
                imgs, labs = z["images"], z["labels"]
            if images is None:
                images = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=(n, *imgs.shape[1:]))
                labels = np.empty(n, dtype=np.int64)
            keep = ~taken[b:e]              # two runs on one folder may have written the same ids: same images
            images[b:e][keep], labels[b:e][keep] = imgs[keep], labs[keep]
            taken[b:e] = True
        images.flush()
        final = os.path.join(out_dir, "samples.npz")
        tmp_npz = os.path.join(out_dir, f".samples.{os.getpid()}.npz.tmp")
        with zipfile.ZipFile(tmp_npz, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.write(tmp_npy, "arr_0.npy")
            with zf.open("labels.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, labels)
        os.replace(tmp_npz, final)
    finally:
        del images
        if os.path.exists(tmp_npy):
            os.unlink(tmp_npy)
    return final


def _grid(out_dir: str, classes: Sequence[int], per_class: int, max_classes: int = 32, max_per_class: int = 8) -> str:
    """``grid.png``: up to ``max_per_class`` images of each of the first ``max_classes`` classes, a row each."""
    from fastvar.utils.images import make_grid, save_png
    k = min(per_class, max_per_class)
    with np.load(os.path.join(out_dir, "samples.npz"), mmap_mode="r") as z:
        rows = [z["arr_0"][ci * per_class: ci * per_class + k] for ci in range(min(len(classes), max_classes))]
    imgs = torch.from_numpy(np.concatenate(rows)).permute(0, 3, 1, 2).float().div_(255)
    return save_png(make_grid(imgs, ncol=k), os.path.join(out_dir, "grid.png"))


# ---------------------------------------------------------------------------------------- manifest
def _model_identity(args) -> Dict[str, object]:
    if not args.var_ckpt:
        from fastvar.pretrained import DIGITS_PATH
        return {"bundled": "digits", "bytes": os.path.getsize(DIGITS_PATH)}
    return {"var_ckpt": os.path.abspath(args.var_ckpt), "var_bytes": os.path.getsize(args.var_ckpt),
            "vae_ckpt": os.path.abspath(args.vae_ckpt), "vae_bytes": os.path.getsize(args.vae_ckpt)}


def _manifest(args, classes, settings, image_hw) -> Dict[str, object]:
    """The VAR manifest (``settings`` None: the model and settings fields are left for the caller, Infinity)."""
    import fastvar
    from fastvar.utils.benchmarking import git_commit
    model = _model_identity(args) if settings is not None else None
    return {"format": MANIFEST_FORMAT, "model": model, "classes": list(classes),
            "num_per_class": args.num_per_class, "seed": args.seed, "cfg": getattr(settings, "cfg", None),
            "top_k": getattr(settings, "top_k", None), "top_p": getattr(settings, "top_p", None),
            "more_smooth": getattr(settings, "more_smooth", None), "dtype": args.dtype,
            "image_hw": list(image_hw), "num_images": len(classes) * args.num_per_class,
            "order": "class-major: image i of classes[c] is arr_0[c * num_per_class + i]",
            "image_seed": "fastvar.generate.image_seed(seed, class, i)",
            "versions": {"fastvar": fastvar.__version__, "torch": torch.__version__}, "commit": git_commit()}


def check_or_write_manifest(out_dir: str, manifest: Dict[str, object], keys: Sequence[str] = IMAGE_KEYS) -> None:
    """First run: write the manifest. Restart: the settings that make the images (``keys``) must be the same."""
    from fastvar.utils.files import atomic_write
    path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is not a readable manifest ({e}); use another --out-dir") from None
        if old.get("format") != MANIFEST_FORMAT:
            raise UserError(f"{path} is not a fastvar generate manifest; use another --out-dir")
        differ = [k for k in keys if old.get(k) != manifest[k]]
        if differ:
            what = "; ".join(f"{k}: {old.get(k)!r} before, {manifest[k]!r} now" for k in differ)
            raise UserError(f"{out_dir} holds a run with other settings ({what}); use another --out-dir, or "
                                "the same settings to resume it")
        return
    atomic_write(path, lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode()))


# -------------------------------------------------------------------------------------- Infinity
def load_prompt_features(path: str, text_channels: int) -> Tuple[List[torch.Tensor], str]:
    """The per-prompt text features of ``path`` (see the module docstring) as float32 ``(len_i, C_t5)`` CPU tensors,
    and the file's SHA-256 (the manifest's identity of the prompts). ``UserError`` saying what is wrong."""
    from fastvar.utils.files import load_tensors
    if not os.path.isfile(path):
        raise UserError(f"--prompts: {path} not found")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError("--prompts: reading a .safetensors file needs the safetensors package "
                                "(pip install safetensors), or save the features with torch.save") from None
        raw = load_file(path)
        if not all(k.isdigit() for k in raw) or sorted(int(k) for k in raw) != list(range(len(raw))):
            raise UserError(f"--prompts: the keys of {path} must be the prompt indices 0..n-1, got {sorted(raw)[:8]}")
        feats = [raw[str(i)] for i in range(len(raw))]
    else:
        try:
            raw = load_tensors(path, "--prompts file")
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from None
        feats = raw.get("features") if isinstance(raw, dict) else raw
        if not isinstance(feats, (list, tuple)):
            raise UserError(f"--prompts: {path} must hold a list of (len, C_t5) tensors (or a dict with one under "
                                f"'features'), got {type(raw).__name__}")
    if not feats:
        raise UserError(f"--prompts: {path} holds no prompt")
    out = []
    for i, f in enumerate(feats):
        if not isinstance(f, torch.Tensor) or not f.is_floating_point() or f.dim() != 2 or f.shape[0] < 1 \
                or f.shape[1] != text_channels:
            what = f"{f.dtype} {tuple(f.shape)}" if isinstance(f, torch.Tensor) else type(f).__name__
            raise UserError(f"--prompts: prompt {i} must be a float (len >= 1, C_t5={text_channels}) tensor, got "
                                f"{what}")
        out.append(f.float().contiguous())
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    return out, digest


def _infinity_setup(args, group, dtype):
    """Infinity's model, prompts, settings and sampling function for :func:`cmd_generate`."""
    from fastvar import dynamic_resolution
    from fastvar.cli import as_option_error
    from fastvar.models import load_infinity
    from fastvar.sampler import Sampler
    from fastvar.sampler.infinity import DEFAULTS as INFINITY_DEFAULTS
    from fastvar.utils.files import checkpoint_bytes
    if args.var_ckpt:
        raise UserError("pass --var-ckpt or --infinity-ckpt, not both")
    if not args.vae_ckpt:
        raise UserError("--infinity-ckpt needs --vae-ckpt (the BSQ VAE checkpoint)")
    if not args.prompts:
        raise UserError("--infinity-ckpt needs --prompts (a file of per-prompt text features)")
    if args.more_smooth:
        raise UserError("--more-smooth is VAR's option; Infinity has no such mode")
    try:
        sched = dynamic_resolution.scale_schedule(args.h_div_w, args.pn)
        cil = [int(x) for x in args.cfg_insertion_layer.split(",") if x.strip()]
    except (TypeError, ValueError) as e:
        raise UserError(f"--h-div-w / --pn / --cfg-insertion-layer: {e}") from None
    try:
        vae, model = load_infinity(args.infinity_ckpt, args.vae_ckpt, device=group.device, dtype=dtype)
    except (FileNotFoundError, ImportError, ValueError) as e:    # ImportError: .safetensors shards, no safetensors
        raise UserError(str(e)) from None
    feats, digest = load_prompt_features(args.prompts, model.Ct5)
    prompts = parse_classes(args.classes, len(feats), noun="prompt", holder="prompt file")
    given = {"cfg": args.cfg, "tau": args.tau, "top_k": args.top_k, "top_p": args.top_p}
    kwargs = dict(scale_schedule=sched, cfg_insertion_layer=cil,
                  **{k: INFINITY_DEFAULTS[k] if v is None else v for k, v in given.items()})
    try:
        sampler = Sampler(model, vae, dtype=dtype, cuda_graphs=group.device.type == "cuda")
        settings = sampler.settings(**kwargs)
    except (TypeError, ValueError) as e:
        raise as_option_error(e, OPTION_NAMES) from None
    if settings.guided:
        long = [p for p in prompts if feats[p].shape[0] > model.cfg_uncond.shape[0]]
        if long:
            raise UserError(f"--prompts: prompt {long[0]} has {feats[long[0]].shape[0]} tokens, more than the "
                                f"model's empty prompt cfg_uncond ({model.cfg_uncond.shape[0]}), which guidance uses")

    def sample(ids, seeds):
        lens = [feats[p].shape[0] for p in ids]
        kv = torch.cat([feats[p] for p in ids]).to(group.device)
        cu = torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int32, device=group.device)
        return sampler.sample((kv, lens, cu, max(lens)), image_seeds=seeds, **kwargs)

    identity = {"infinity_ckpt": os.path.abspath(args.infinity_ckpt), "infinity_bytes": checkpoint_bytes(args.infinity_ckpt),
                "vae_ckpt": os.path.abspath(args.vae_ckpt), "vae_bytes": checkpoint_bytes(args.vae_ckpt)}
    extra = {"model": identity, "cfg": list(settings.cfg), "tau": list(settings.tau), "top_k": settings.top_k,
             "top_p": settings.top_p, "more_smooth": False, "cfg_insertion_layer": cil,
             "scale_schedule": [list(x) for x in settings.scale_schedule],
             "prompts": {"sha256": digest, "count": len(feats)},
             "order": "prompt-major: image i of classes[c] (a prompt index) is arr_0[c * num_per_class + i]"}
    return prompts, sample, dynamic_resolution.image_size(sched), extra


# ------------------------------------------------------------------------------------------- run
def add_parser(sub) -> argparse.ArgumentParser:
    from fastvar.sampler.infinity import DEFAULTS as INFINITY_DEFAULTS
    from fastvar.settings import RELEASED_SETTINGS
    g = sub.add_parser("generate", help="many images for FID / IS into one samples.npz (resumable, any number of "
                                        "processes under torchrun)",
                       description=__doc__.split("\n\n")[0])
    g.add_argument("--out-dir", required=True, help="folder for samples.npz, manifest.json, grid.png and the shards (required, no default)")
    g.add_argument("--num-per-class", type=int, required=True,
                   help="images of each class (FID-50k: 50); Infinity: of each prompt (required, no default)")
    g.add_argument("--classes", default="all",
                   help="comma-separated class ids (Infinity: prompt indices), or 'all' (default: all)")
    g.add_argument("--seed", type=int, default=0, help="image i of class c uses image_seed(seed, c, i) (default: 0)")
    g.add_argument("--batch-size", type=int, default=32, help="images sampled at once per process (default: 32)")
    def default(name):
        return (f"default: the model's: the bundled model's own; {RELEASED_SETTINGS[name]} for VAR checkpoints"
                + (" (at most the vocabulary)" if name == "top_k" else "")
                + f"; {INFINITY_DEFAULTS[name]} with --infinity-ckpt")
    g.add_argument("--cfg", type=float, default=None, help=f"guidance ({default('cfg')})")
    g.add_argument("--top-k", type=int, default=None, help=f"top-k, 0 = off ({default('top_k')})")
    g.add_argument("--top-p", type=float, default=None, help=f"top-p, 0 = off ({default('top_p')})")
    g.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax-weighted codes, the official visualisation option (default: off)")
    g.add_argument("--var-ckpt", help="VAR checkpoint (default: the bundled digits model)")
    g.add_argument("--vae-ckpt", help="VQVAE checkpoint (Infinity: the BSQ VAE checkpoint; default: the bundled digits model)")
    g.add_argument("--infinity-ckpt", help="Infinity checkpoint, a file or a sharded folder (infinity_8b_weights/) (text-to-image; needs --vae-ckpt and --prompts; default: none, a VAR)")
    g.add_argument("--prompts", help="Infinity: per-prompt text features, a .pt list of (len, C_t5) tensors (default: none)")
    g.add_argument("--tau", type=float, default=None,
                   help=f"Infinity: temperature (default: {INFINITY_DEFAULTS['tau']})")
    layers = ",".join(map(str, INFINITY_DEFAULTS["cfg_insertion_layer"]))
    g.add_argument("--cfg-insertion-layer", default=layers,
                   help="Infinity: 0 = guidance on the logits, k < 0 = on the hidden state after block depth + k "
                        f"(comma-separated; default: {layers})")
    g.add_argument("--h-div-w", type=float, default=1.0, help="Infinity: aspect ratio h/w (nearest template; default 1)")
    g.add_argument("--pn", default="1M", help="Infinity: size, 0.06M / 0.25M / 0.60M / 1M (default: 1M, 1024 px)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype, also the dtype the weights are loaded in (default: float32)")
    g.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds a rank waits for the others before it stops with an error (default: 1800)")
    g.add_argument("--quiet", action="store_true", help="no progress bar (default: off; the bar is drawn on a terminal only)")
    return g


def _check_args(args) -> str:
    if args.num_per_class < 1:
        raise UserError(f"--num-per-class must be >= 1, got {args.num_per_class}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_seed_option(args.seed, "--seed", "image i of class c uses the seed SHA-256(seed, c, i) (image_seed)")
    if not args.timeout > 0:
        raise UserError(f"--timeout must be positive, got {args.timeout}")
    out_dir = os.path.abspath(os.path.expanduser(args.out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out-dir {out_dir} exists and is not a folder")
    parent = out_dir if os.path.isdir(out_dir) else os.path.dirname(out_dir)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out-dir: {parent} is not a writable folder")
    return out_dir


def cmd_generate(args) -> str:
    """Run (or resume) the generation; returns the final line. Errors: :class:`UserError`."""
    from fastvar import cli     # its checks, shared by the commands that sample (cli.sample_memory looked up late)
    from fastvar.pretrained import load_models
    from fastvar.sampler import Sampler
    from fastvar.utils.images import to_uint8
    from fastvar.utils.progress import Progress
    out_dir = _check_args(args)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    group = Group(args.timeout)
    try:
        cli.check_backend(group.device)
        if getattr(args, "infinity_ckpt", None):
            classes, sample, image_hw, extra = _infinity_setup(args, group, dtype)
            manifest = dict(_manifest(args, classes, None, image_hw), **extra)
            keys = INFINITY_IMAGE_KEYS
        else:
            try:
                vae, var, info = load_models(args.var_ckpt, args.vae_ckpt, device=group.device, dtype=dtype,
                                             names=("--var-ckpt", "--vae-ckpt"))
            except (FileNotFoundError, ValueError) as e:
                raise UserError(str(e)) from None
            classes = parse_classes(args.classes, var.num_classes)
            try:
                sampler = Sampler(var, vae, dtype=dtype, cuda_graphs=group.device.type == "cuda")
                settings = sampler.settings(info["cfg"] if args.cfg is None else args.cfg,
                                            info["top_k"] if args.top_k is None else args.top_k,
                                            info["top_p"] if args.top_p is None else args.top_p, args.more_smooth)
            except (TypeError, ValueError) as e:
                raise cli.as_option_error(e, OPTION_NAMES) from None
            # one batch at a time: a batch of one image is sampled as two (see the loop), and the images go to
            # the shards, not into memory
            most = max(min(args.batch_size, len(classes) * args.num_per_class), 2)
            cli.check_memory(cli.sample_memory(var, vae, most, most, 1, 1), group.device,
                             f"--batch-size {args.batch_size} images at a time", f"--batch-size {args.batch_size}")
            image_hw = tuple(sampler.decode(torch.zeros(1, var.Cvae, *var.schedule.hws[-1],
                                                        device=group.device)).shape[-2:])
            manifest, keys = _manifest(args, classes, settings, image_hw), IMAGE_KEYS

            def sample(labels, seeds):
                return sampler.sample(labels, image_seeds=seeds, cfg=settings.cfg, top_k=settings.top_k,
                                      top_p=settings.top_p, more_smooth=settings.more_smooth)
        K, n = args.num_per_class, len(classes) * args.num_per_class
        shard_dir = os.path.join(out_dir, "shards")
        if group.rank == 0:
            os.makedirs(shard_dir, exist_ok=True)
            check_or_write_manifest(out_dir, manifest, keys)
        group.barrier("manifest written")
        batches = todo_batches(n, done_ranges(shard_dir), args.batch_size)
        group.barrier("work planned")       # every rank planned from the same finished shards
        mine = batches[group.rank::group.world]
        prog = Progress(n, "[generate]", enabled=group.rank == 0 and not args.quiet)
        start, made = time.perf_counter(), 0
        for b, e in mine:
            group.stop_if_another_failed()
            ids = list(range(b, e))
            labels = [classes[i // K] for i in ids]
            seeds = [image_seed(args.seed, classes[i // K], i % K) for i in ids]
            pad = len(ids) == 1         # batch size 1 runs other CPU convolution algorithms: sample two copies
            try:
                imgs = sample(labels * (2 if pad else 1), seeds * (2 if pad else 1))[:len(ids)]
            except (TypeError, ValueError) as err:
                raise cli.as_option_error(err, OPTION_NAMES) from None
            except torch.OutOfMemoryError:
                raise UserError(f"--batch-size {args.batch_size}: out of memory while sampling; lower "
                                "--batch-size") from None
            if not bool(torch.isfinite(imgs).all()):
                raise UserError(f"the images of ids {b}..{e - 1} hold NaN or inf (a diverged model?); "
                                    "nothing was written for them")
            arr = to_uint8(imgs).numpy()
            _save_shard(shard_dir, b, e, arr, np.asarray(labels, dtype=np.int64))
            made += len(ids)
            if group.rank == 0:
                done = sum(e_ - b_ for b_, e_ in done_ranges(shard_dir))
                rate = made * group.world / max(time.perf_counter() - start, 1e-9)
                prog.update(min(done, n), f"{rate:.1f} img/s, ETA {max(n - done, 0) / max(rate, 1e-9):.0f} s")
        group.barrier("all shards written")
        elapsed = time.perf_counter() - start
        if group.rank != 0:
            return ""
        path = assemble(out_dir, n)
        grid = _grid(out_dir, classes, K)
        if not args.quiet:
            prog.close(f"{n} images")
        per_device = made / elapsed if elapsed > 0 else float("nan")
        noun = "prompts" if getattr(args, "infinity_ckpt", None) else "classes"
        return (f"wrote {n} images ({len(classes)} {noun} x {K}, {image_hw[0]}x{image_hw[1]} px) to {path} "
                f"(grid: {grid}); this run sampled {sum(e - b for b, e in batches)} of them in {elapsed:.1f} s on "
                f"{group.world} device(s): {per_device:.2f} images/s on rank 0")
    except BaseException as e:
        group.record_failure(e)
        raise
    finally:
        group.close()
