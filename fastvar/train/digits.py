"""Train the small class-conditional VQVAE + VAR pair on scikit-learn's 8x8 handwritten digits.

    python -m fastvar.train.digits --out runs/digits --export fastvar/weights/digits.pt

Two phases, both with fastvar's own model classes (the released-size ones, small hyper-parameters):

1. the VQVAE (``fastvar.models.VQVAE``, multi-scale residual quantizer) on the digits upsampled to
   16x16 (bicubic, [-1, 1], grey repeated over RGB), reconstruction MSE + the quantizer's VQ loss;
2. the VAR (``fastvar.models.VAR``, 10 classes, ``attn_l2_norm=True``) by teacher forcing: the token
   indices of every image (``vae.img_to_idxBl``) and the teacher-forcing inputs
   (``quantize.idxBl_to_var_input``) are computed once after phase 1; cross-entropy over all tokens,
   labels dropped with ``cond_drop_rate`` for classifier-free guidance.

Reproducible: ``torch.manual_seed(seed)`` before each model is built, every epoch's data order and
augmentation from a generator seeded by ``(seed, phase, epoch)``, and the global RNG state (label
dropout) saved in every checkpoint. ``--resume`` continues from ``OUT/last.pt`` to the same weights
as an uninterrupted run. Bit-identical weights need the same thread count (``--threads``, default 1)
and the same kind of CPU: float sums depend on how the work is split and vectorised.

Checkpoints are dicts of state dicts, the plain-value config, the optimizer state and the RNG state
(``torch.save``), written to a temporary file and renamed into place; all load with
``torch.load(weights_only=True)``. The export (``--export``) is the bundled-weights format read by
``fastvar.pretrained.load_digits``.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from fastvar.models import VAR, VQVAE
from fastvar.reference import quantize as ref_quant
from fastvar.utils.files import atomic_write, check_writable, load_tensors
from fastvar.utils.progress import Progress
from fastvar.train.data import CLASS_NAMES, NUM_CLASSES, RESAMPLE_MODES, load_digit_images, shift_images

CKPT_NAME = "last.pt"
EXPORT_NAME = "digits.pt"
FORMAT = "fastvar.train.digits/1"
PHASES = ("vae", "var")

# Every training choice, as plain values. --resume requires the checkpoint's to be the same.
DEFAULTS: Dict[str, Any] = dict(
    seed=0,
    subset=0,                     # 0: all 1,797 images; n: the first n (smoke tests)
    image_size=16,
    resample="bicubic",           # closest to the raw 8x8 after area-downsampling back (mean |err| 0.64 of 16)
    shift=1,                      # augmentation: +-pixels at image_size (VQVAE phase only)
    # VQVAE
    vocab_size=512,
    z_channels=16,
    ch=16,
    ch_mult=(1, 2, 2),
    num_res_blocks=1,
    norm_groups=8,
    using_sa=False,
    patch_nums=(1, 2, 3, 4),
    vae_epochs=20,
    vae_batch=64,
    vae_lr=2e-3,
    beta=0.25,
    restart_until=0.7,            # restart dead codes after every epoch in this first fraction of the epochs
    # VAR
    depth=3,
    embed_dim=96,
    num_heads=3,
    drop_path_rate=0.0,
    cond_drop_rate=0.1,
    var_epochs=60,
    var_batch=64,
    var_lr=1e-3,
    var_wd=0.05,
    warmup_frac=0.05,
    # recommended sampling settings, written into the export
    cfg=2.0,
    top_k=0,
    top_p=0.0,
)

# config keys that do not change the trained weights (may differ on --resume)
NOT_TRAINING = ("cfg", "top_k", "top_p")


class TrainError(Exception):
    """A user error (bad option, unwritable path, mismatching checkpoint): one line, exit status 2."""


# ---------------------------------------------------------------------------- command line

def _ints(text: str) -> Tuple[int, ...]:
    try:
        vals = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError(f"expected at least one int, got {text!r}")
    return vals


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastvar.train.digits",
                                description="Train the small digits VQVAE + VAR bundled with fastvar.")
    p.add_argument("--out", required=True, help=f"output folder (checkpoint {CKPT_NAME}, final {EXPORT_NAME})")
    p.add_argument("--resume", action="store_true", help=f"continue from OUT/{CKPT_NAME}")
    p.add_argument("--export", default=None,
                   help=f"also write the final weights here (e.g. fastvar/weights/{EXPORT_NAME})")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: weights that do not depend on the core count, and on "
                        "a busy 2-core machine 2 threads ran 12-17x slower; 0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only one line per epoch")
    p.add_argument("--no-eval", action="store_true", help="skip the final classifier check of samples")
    p.add_argument("--stop-after", type=int, default=0, metavar="N",
                   help="stop after N epochs of this run (to test --resume); the checkpoint is kept")
    types = {tuple: _ints, bool: _bool}
    for key, val in DEFAULTS.items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, default=val, type=types.get(type(val), type(val)),
                       help=f"default {','.join(map(str, val)) if isinstance(val, tuple) else val}")
    return p


def config_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    cfg = {k: getattr(args, k) for k in DEFAULTS}
    check_config(cfg)
    return cfg


def check_config(c: Dict[str, Any]) -> None:
    """``TrainError`` naming the option for any value that cannot train."""
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise TrainError(f"--{key.replace('_', '-')} must be {what}, got {c[key]!r}")
    for key in ("vae_epochs", "var_epochs", "subset", "shift", "seed", "top_k"):
        need(c[key] >= 0, key, ">= 0")
    for key in ("image_size", "vocab_size", "z_channels", "ch", "num_res_blocks", "norm_groups", "depth",
                "embed_dim", "num_heads", "vae_batch", "var_batch"):
        need(c[key] >= 1, key, ">= 1")
    for key in ("vae_lr", "var_lr"):
        need(c[key] > 0, key, "> 0")
    need(c["resample"] in RESAMPLE_MODES, "resample", f"one of {RESAMPLE_MODES}")
    for key in ("cond_drop_rate", "drop_path_rate", "warmup_frac"):
        need(0 <= c[key] < 1, key, "in [0, 1)")
    need(0 <= c["restart_until"] <= 1, "restart_until", "in [0, 1]")
    for key in ("beta", "var_wd"):
        need(c[key] >= 0, key, ">= 0")
    need(0 <= c["top_p"] <= 1, "top_p", "in [0, 1]")
    need(c["top_k"] <= c["vocab_size"], "top_k", f"<= --vocab-size ({c['vocab_size']})")
    need(c["image_size"] % 8 == 0, "image_size", "a multiple of 8 (samples are checked at 8x8)")
    need(c["embed_dim"] % c["num_heads"] == 0, "embed_dim", f"divisible by --num-heads ({c['num_heads']})")
    need(all(c["ch"] * m % c["norm_groups"] == 0 for m in c["ch_mult"]) and min(c["ch_mult"]) >= 1, "ch",
         f"such that every ch * ch_mult is divisible by --norm-groups ({c['norm_groups']})")
    down = 2 ** (len(c["ch_mult"]) - 1)
    need(c["image_size"] % down == 0, "image_size", f"divisible by 2**(len(ch_mult) - 1) = {down}")
    latent = c["image_size"] // down
    need(c["patch_nums"][-1] == latent and all(0 < a < b for a, b in zip(c["patch_nums"], c["patch_nums"][1:]))
         and c["patch_nums"][0] >= 1, "patch_nums",
         f"increasing and end at the latent size image_size / {down} = {latent}")


def check_out_dir(path: str) -> str:
    """Create ``path`` if needed; ``TrainError`` if it cannot hold checkpoints."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise TrainError(f"--out must be a folder, got an existing file: {path}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise TrainError(f"--out: cannot create the folder {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise TrainError(f"--out: the folder {path} is not writable")
    return path


def check_file_target(path: str, name: str) -> str:
    """``TrainError`` unless a file can be created at ``path`` (checked before training, not after)."""
    try:
        return check_writable(path, name)
    except ValueError as e:
        raise TrainError(str(e)) from None


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` without ever leaving a half-written file."""
    atomic_write(path, lambda f: torch.save(obj, f))


# ---------------------------------------------------------------------------- models

def vae_config(c: Dict[str, Any]) -> Dict[str, Any]:
    """``VQVAE`` constructor arguments (plain values) of training config ``c``."""
    return dict(vocab_size=c["vocab_size"], z_channels=c["z_channels"], ch=c["ch"], dropout=0.0, beta=c["beta"],
                using_znorm=False, quant_conv_ks=3, quant_resi=0.5, share_quant_resi=4, default_qresi_counts=0,
                v_patch_nums=tuple(c["patch_nums"]), ch_mult=tuple(c["ch_mult"]), num_res_blocks=c["num_res_blocks"],
                in_channels=3, norm_groups=c["norm_groups"], using_sa=c["using_sa"], using_mid_sa=c["using_sa"])


def var_config(c: Dict[str, Any]) -> Dict[str, Any]:
    """``VAR`` constructor arguments (plain values) of training config ``c``."""
    return dict(num_classes=NUM_CLASSES, depth=c["depth"], embed_dim=c["embed_dim"], num_heads=c["num_heads"],
                mlp_ratio=4.0, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=c["drop_path_rate"], norm_eps=1e-6,
                shared_aln=False, cond_drop_rate=c["cond_drop_rate"], attn_l2_norm=True,
                patch_nums=tuple(c["patch_nums"]))


def make_vae(c: Dict[str, Any]) -> VQVAE:
    torch.manual_seed(c["seed"])
    return VQVAE(test_mode=False, **vae_config(c))


def make_var(c: Dict[str, Any], vae: VQVAE) -> VAR:
    torch.manual_seed(c["seed"] + 1)
    var = VAR(vae_local=vae, **var_config(c))
    var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)   # the official rule
    return var


def freeze(vae: VQVAE) -> VQVAE:
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    return vae


# ---------------------------------------------------------------------------- training

def epoch_generator(c: Dict[str, Any], phase: str, epoch: int) -> torch.Generator:
    """The generator of one epoch's data order and augmentation: a function of (seed, phase, epoch) only."""
    return torch.Generator().manual_seed(c["seed"] * 1_000_003 + PHASES.index(phase) * 100_003 + epoch)


def lr_at(step: int, total: int, base: float, warmup_frac: float) -> float:
    """Linear warm-up, then cosine decay to 1% of ``base``."""
    warm = max(1, int(total * warmup_frac))
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def make_optimizer(params, lr: float, wd: float) -> torch.optim.Optimizer:
    decay = [p for p in params if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in params if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def vae_epoch(c, vae, opt, x, epoch, prog: Progress) -> Dict[str, float]:
    gen = epoch_generator(c, "vae", epoch)
    N, bs = len(x), c["vae_batch"]
    steps = math.ceil(N / bs)
    perm = torch.randperm(N, generator=gen)
    vae.train()
    tot = dict(loss=0.0, rec=0.0, vq=0.0)
    for i in range(steps):
        idx = perm[i * bs:(i + 1) * bs]
        xb = shift_images(x[idx], c["shift"], gen)
        set_lr(opt, lr_at(epoch * steps + i, c["vae_epochs"] * steps, c["vae_lr"], c["warmup_frac"]))
        rec, _, vq = vae(xb)
        rec_loss = F.mse_loss(rec, xb)
        loss = rec_loss + vq
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for k, v in (("loss", loss), ("rec", rec_loss), ("vq", vq)):
            tot[k] += float(v.detach()) * len(idx)
        prog.update(i + 1, f"loss {tot['loss'] / min(N, (i + 1) * bs):.4f}")
    out = {k: v / N for k, v in tot.items()}
    out["restarted"] = restart_dead_codes(vae, opt, x, gen) if epoch + 1 < c["restart_until"] * c["vae_epochs"] else 0
    return out


@torch.no_grad()
def restart_dead_codes(vae: VQVAE, opt: torch.optim.Optimizer, x: torch.Tensor, gen: torch.Generator,
                       batch: int = 512) -> int:
    """Codebook restart: every code that no image of ``x`` uses (at any scale) is moved onto a random
    residual vector the quantizer actually sees (drawn with ``gen``), and its Adam moments are cleared.
    Without it most of the codebook dies early (30 of 512 codes in use after 20 epochs). Returns how
    many codes were restarted."""
    q = vae.quantize
    was_training = vae.training
    vae.eval()
    hits = torch.zeros(q.vocab_size, dtype=torch.long)
    pool = []
    phis = q.phis(len(q.patch_hws))
    for i in range(0, len(x), batch):
        f = vae.quant_conv(vae.encoder(x[i:i + batch])).float()
        for z, idx, _ in ref_quant.residual_quantize(f, q.embedding.weight, q.patch_hws, phis, q.lookup):
            hits += idx.bincount(minlength=q.vocab_size)
            pool.append(z)
    vae.train(was_training)
    dead = (hits == 0).nonzero().flatten()
    if len(dead):
        pool = torch.cat(pool)
        w = q.embedding.weight
        w.data[dead] = pool[torch.randint(len(pool), (len(dead),), generator=gen)]
        for key, buf in opt.state.get(w, {}).items():
            if isinstance(buf, torch.Tensor) and buf.shape == w.shape:
                buf[dead] = 0
    return len(dead)


@torch.no_grad()
def encode_dataset(vae: VQVAE, x: torch.Tensor, batch: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token indices ``(N, L)`` int64 and teacher-forcing inputs ``(N, L - first_l, Cvae)`` of every image."""
    idx, inp = [], []
    for i in range(0, len(x), batch):
        idx_Bl = vae.img_to_idxBl(x[i:i + batch])
        idx.append(torch.cat(idx_Bl, dim=1))
        inp.append(vae.quantize.idxBl_to_var_input(idx_Bl))
    return torch.cat(idx), torch.cat(inp)


@torch.no_grad()
def vae_report(vae: VQVAE, x: torch.Tensor, tokens: torch.Tensor) -> str:
    rec = torch.cat([vae.img_to_reconstructed_img(x[i:i + 256], last_one=True) for i in range(0, len(x), 256)])
    used = tokens.unique().numel()
    return f"reconstruction MSE {F.mse_loss(rec, x).item():.4f}, {used}/{vae.vocab_size} codes in use"


def var_epoch(c, var, opt, tokens, inputs, labels, epoch, prog: Progress) -> Dict[str, float]:
    gen = epoch_generator(c, "var", epoch)
    N, bs = len(tokens), c["var_batch"]
    steps = math.ceil(N / bs)
    perm = torch.randperm(N, generator=gen)
    var.train()
    tot = dict(loss=0.0, acc=0.0, last=0.0)
    last_b, last_e = var.begin_ends[-1]
    for i in range(steps):
        idx = perm[i * bs:(i + 1) * bs]
        set_lr(opt, lr_at(epoch * steps + i, c["var_epochs"] * steps, c["var_lr"], c["warmup_frac"]))
        logits = var(labels[idx], inputs[idx])                                  # (B, L, V), label dropout inside
        gt = tokens[idx]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), gt.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        opt.step()
        with torch.no_grad():
            acc = (logits.argmax(-1) == gt).float()
        tot["loss"] += float(loss.detach()) * len(idx)
        tot["acc"] += float(acc.mean()) * len(idx)
        tot["last"] += float(acc[:, last_b:last_e].mean()) * len(idx)
        prog.update(i + 1, f"loss {tot['loss'] / min(N, (i + 1) * bs):.4f}")
    return {k: v / N for k, v in tot.items()}


# ---------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: str, c, phase: str, epoch: int, vae: VQVAE, var: Optional[VAR], opt, history,
                    elapsed: float) -> None:
    atomic_save({
        "format": FORMAT, "config": dict(c), "phase": phase, "epoch": epoch,
        "vae": vae.state_dict(), "vae_record_hit": int(vae.quantize.record_hit),
        "var": None if var is None else var.state_dict(),
        "optimizer": None if opt is None else opt.state_dict(),
        "rng": torch.get_rng_state(), "history": history, "elapsed": float(elapsed),
    }, path)


def load_checkpoint(path: str, c: Dict[str, Any]) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise TrainError(f"--resume: no checkpoint at {path} (train without --resume first)")
    try:
        ck = load_tensors(path, "--resume: checkpoint")
    except ValueError as e:
        raise TrainError(str(e)) from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise TrainError(f"--resume: {path} is not a {FORMAT} checkpoint")
    old = {k: (tuple(v) if isinstance(v, list) else v) for k, v in ck["config"].items()}
    diff = [f"--{k.replace('_', '-')} {old.get(k)!r} -> {c[k]!r}" for k in c
            if k not in NOT_TRAINING and old.get(k) != c[k]]
    if diff:
        raise TrainError("--resume: the training options differ from the checkpoint's ("
                         + "; ".join(diff) + "); pass the same options, or start a new --out")
    return ck


def export_dict(c: Dict[str, Any], vae: VQVAE, var: VAR, history, elapsed: float, command: str) -> Dict[str, Any]:
    """The bundled-weights format (see ``fastvar.pretrained``)."""
    return {
        "format": "fastvar.digits/1",
        "config": {
            "vae": vae_config(c), "var": var_config(c), "train": dict(c),
            "image_size": c["image_size"], "class_names": list(CLASS_NAMES),
            "data": "sklearn.datasets.load_digits (1,797 8x8 images, values 0..16), "
                    f"{c['resample']}-upsampled to {c['image_size']}x{c['image_size']}, [-1, 1], grey as RGB",
            "command": command, "train_seconds": round(float(elapsed), 1),
            "torch": str(torch.__version__), "threads": torch.get_num_threads(), "machine": platform.machine(),
            "final_losses": {ph: (history[ph][-1] if history[ph] else None) for ph in PHASES},
        },
        "vae": {k: v.clone() for k, v in vae.state_dict().items()},
        "var": {k: v.clone() for k, v in var.state_dict().items()},
        "sampling": {"cfg": float(c["cfg"]), "top_k": int(c["top_k"]), "top_p": float(c["top_p"])},
    }


# ---------------------------------------------------------------------------- main

def train(c: Dict[str, Any], out: str, resume: bool = False, export: Optional[str] = None, quiet: bool = False,
          evaluate: bool = True, stop_after: int = 0, command: str = "", log=None) -> Dict[str, Any]:
    """Run (or continue) both phases; returns the export dict (also written to ``OUT/digits.pt``)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    ckpt_path = os.path.join(out, CKPT_NAME)
    x, y = load_digit_images(c["image_size"], c["resample"])
    if c["subset"]:
        x, y = x[:c["subset"]], y[:c["subset"]]
    ck = load_checkpoint(ckpt_path, c) if resume else None
    history = ck["history"] if ck else {ph: [] for ph in PHASES}
    elapsed0 = ck["elapsed"] if ck else 0.0
    t0 = time.perf_counter()
    elapsed = lambda: elapsed0 + time.perf_counter() - t0   # noqa: E731
    budget = [stop_after if stop_after > 0 else -1]

    def tick() -> bool:                           # True: stop here (--stop-after)
        if budget[0] > 0:
            budget[0] -= 1
            return budget[0] == 0
        return False

    # ---- phase 1: the VQVAE
    vae = make_vae(c)
    opt = make_optimizer(list(vae.parameters()), c["vae_lr"], 0.0)
    start = 0
    if ck is not None:
        vae.load_state_dict(ck["vae"])
        vae.quantize.record_hit = ck["vae_record_hit"]
        if ck["phase"] == "vae":
            opt.load_state_dict(ck["optimizer"])
            start = ck["epoch"]
            torch.set_rng_state(ck["rng"])
        else:
            start = c["vae_epochs"]
        log(f"resumed from {ckpt_path}: phase {ck['phase']}, {ck['epoch']} epochs done")
    steps = math.ceil(len(x) / c["vae_batch"])
    for epoch in range(start, c["vae_epochs"]):
        prog = Progress(steps, f"[vae] epoch {epoch + 1}/{c['vae_epochs']}", enabled=not quiet)
        m = vae_epoch(c, vae, opt, x, epoch, prog)
        prog.close(f"loss {m['loss']:.4f} (reconstruction {m['rec']:.4f}, vq {m['vq']:.4f})"
                   + (f", {m['restarted']} dead codes restarted" if m["restarted"] else ""))
        history["vae"].append(m["loss"])
        save_checkpoint(ckpt_path, c, "vae", epoch + 1, vae, None, opt, history, elapsed())
        if tick():
            log(f"stopped after {stop_after} epochs (--stop-after); continue with --resume")
            return {}
    freeze(vae)

    # ---- phase 2: the VAR, on token indices computed once
    t_enc = time.perf_counter()
    tokens, inputs = encode_dataset(vae, x)
    log(f"[vae] {vae_report(vae, x, tokens)}; tokens of {len(x)} images cached "
        f"({time.perf_counter() - t_enc:.1f}s)")
    var = make_var(c, vae)
    opt = make_optimizer(list(var.parameters()), c["var_lr"], c["var_wd"])
    start = 0
    if ck is not None and ck["phase"] == "var":
        var.load_state_dict(ck["var"])
        opt.load_state_dict(ck["optimizer"])
        start = ck["epoch"]
        torch.set_rng_state(ck["rng"])
    steps = math.ceil(len(x) / c["var_batch"])
    for epoch in range(start, c["var_epochs"]):
        prog = Progress(steps, f"[var] epoch {epoch + 1}/{c['var_epochs']}", enabled=not quiet)
        m = var_epoch(c, var, opt, tokens, inputs, y, epoch, prog)
        prog.close(f"loss {m['loss']:.4f} (token accuracy {m['acc']:.3f}, last scale {m['last']:.3f})")
        history["var"].append(m["loss"])
        save_checkpoint(ckpt_path, c, "var", epoch + 1, vae, var, opt, history, elapsed())
        if tick():
            log(f"stopped after {stop_after} epochs (--stop-after); continue with --resume")
            return {}
    var.eval()
    total = elapsed()
    result = export_dict(c, vae, var, history, total, command)
    atomic_save(result, os.path.join(out, EXPORT_NAME))
    if export:
        atomic_save(result, export)
    log(f"done in {total:.1f}s: {os.path.join(out, EXPORT_NAME)}" + (f" and {export}" if export else ""))
    if evaluate:
        try:
            from fastvar.train.quality import evaluate as judge, sample_per_class
        except ImportError:
            return result
        t = time.perf_counter()
        s = sample_per_class(var, 20, seed=0, cfg=c["cfg"], top_k=c["top_k"], top_p=c["top_p"])
        ev = judge(s["images"], s["labels"])
        per = " ".join(f"{k}:{v:.2f}" for k, v in ev["per_class"].items())
        log(f"[eval] classifier accuracy on 20 samples/class (cfg {c['cfg']}, top_k {c['top_k']}, "
            f"top_p {c['top_p']}): {ev['accuracy']:.3f} [{per}]; spread vs real (min over classes) "
            f"{ev['spread_ratio']:.2f} ({time.perf_counter() - t:.1f}s)")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    threads_before = torch.get_num_threads()     # restored: main() may run inside a larger program
    try:
        c = config_from_args(args)
        out = check_out_dir(args.out)
        export = check_file_target(args.export, "--export") if args.export else None
        if args.threads < 0:
            raise TrainError(f"--threads must be >= 0, got {args.threads}")
        if args.stop_after < 0:
            raise TrainError(f"--stop-after must be >= 0, got {args.stop_after}")
        if args.threads:
            torch.set_num_threads(args.threads)
        command = "python -m fastvar.train.digits " + " ".join(shlex.quote(a) for a in argv)
        train(c, out, resume=args.resume, export=export, quiet=args.quiet, evaluate=not args.no_eval,
              stop_after=args.stop_after, command=command)
    except TrainError as e:
        print(f"fastvar.train.digits: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nfastvar.train.digits: interrupted; the last finished epoch is in "
              f"{os.path.join(args.out, CKPT_NAME)}: continue with the same command and --resume", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
