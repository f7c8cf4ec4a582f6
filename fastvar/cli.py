"""The ``fastvar`` command: ``fastvar info`` and ``fastvar sample``."""
from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import List, Optional, Sequence

import torch


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------- info

def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?")
    except Exception as e:   # report, never crash `info`
        return f"not importable ({type(e).__name__}: {e})"


def info_text() -> str:
    import fastvar
    from fastvar.ops import OPS
    from fastvar.ops._backend import BACKENDS, ENV_VAR, forced_backend, selected_backend, unavailable_reason

    lines = [f"fastvar {fastvar.__version__}",
             f"python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}, "
             f"numpy {_version('numpy')}"]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
        devices.append(torch.device("cuda"))
    else:
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        lines.append(f"no GPU: {why}")
    try:
        forced = forced_backend()
    except ValueError as e:
        forced, lines = None, lines + [f"warning: {e}"]
    lines.append(f"{ENV_VAR}={forced or '(auto)'}  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    lines.append("backends:")
    for backend in BACKENDS:
        for dev in devices:
            why = unavailable_reason(backend, dev)
            lines.append(f"  {backend:7s} on {dev.type:4s}: " + ("usable" if why is None else f"not usable: {why}"))
    lines.append("ops (backend chosen per device):")
    for op, impls in OPS.items():
        chosen = []
        for dev in devices:
            try:
                chosen.append(f"{dev.type}={selected_backend(op, impls, dev)}")
            except RuntimeError as e:
                chosen.append(f"{dev.type}=error ({e})")
        lines.append(f"  {op:24s} {', '.join(chosen)}   [implemented: {', '.join(impls)}]")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- sample

def parse_labels(text: str, num_classes: int) -> List[int]:
    """``"207,360"`` -> ``[207, 360]``; ``ValueError`` naming ``--labels`` for anything else."""
    labels = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            lab = int(part)
        except ValueError:
            raise CliError(f"--labels must be comma-separated class ids, got {part!r} in {text!r}") from None
        if not 0 <= lab < num_classes:
            raise CliError(f"--labels: class {lab} is out of range; this model has classes 0..{num_classes - 1}")
        labels.append(lab)
    if not labels:
        raise CliError(f"--labels must name at least one class, got {text!r}")
    return labels


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CliError(f"--device must be auto, cpu or cuda[:N], got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available here")
    return dev


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_models(args):
    from fastvar.models import load_vae_var
    if bool(args.var_ckpt) != bool(args.vae_ckpt):
        raise CliError("pass both --var-ckpt and --vae-ckpt, or neither")
    if not args.var_ckpt:
        raise CliError("fastvar sample needs --var-ckpt and --vae-ckpt (released VAR checkpoints, or ones saved "
                       "with torch.save(model.state_dict()))")
    try:
        return load_vae_var(args.var_ckpt, args.vae_ckpt, device=_device(args.device), dtype=DTYPES[args.dtype])
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None


def cmd_sample(args) -> str:
    from fastvar.utils.files import check_writable
    from fastvar.utils.images import make_grid, save_png
    try:
        out = check_writable(args.out, "--out")
    except ValueError as e:
        raise CliError(str(e)) from None
    if args.num_per_class < 1:
        raise CliError(f"--num-per-class must be >= 1, got {args.num_per_class}")
    vae, var = load_models(args)
    labels = parse_labels(args.labels, var.num_classes)
    label_B = torch.tensor([lab for lab in labels for _ in range(args.num_per_class)], device=var.lvl_1L.device)
    top_k = min(900, var.V) if args.top_k is None else args.top_k
    try:
        images = var.autoregressive_infer_cfg(B=len(label_B), label_B=label_B, g_seed=args.seed, cfg=args.cfg,
                                              top_k=top_k, top_p=args.top_p, more_smooth=args.more_smooth)
    except (TypeError, ValueError) as e:
        raise CliError(str(e)) from None
    path = save_png(make_grid(images.float(), ncol=args.num_per_class if args.num_per_class > 1 else None), out)
    return f"wrote {len(label_B)} samples ({images.shape[-2]}x{images.shape[-1]}) of classes {labels} to {path}"


# ---------------------------------------------------------------------------- bench

def cmd_bench(args) -> str:
    from fastvar.benchmark import MODELS, run_benchmark
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        raise CliError(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
    if any(b < 1 for b in args.batches):
        raise CliError(f"--batches must be positive, got {args.batches}")
    try:
        rows = run_benchmark(models=args.models, batches=args.batches, providers=args.providers,
                             dtype=DTYPES[args.dtype], reps=args.reps, out_dir=args.out_dir, smoke=args.smoke)
    except RuntimeError as e:
        raise CliError(str(e)) from None
    return f"{len(rows)} measurements"


# ---------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastvar", description="fast kernels and sampler for VAR")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, usable backends and why not")
    s = sub.add_parser("sample", help="sample class-conditional images into a PNG grid")
    s.add_argument("--var-ckpt", help="VAR checkpoint (state dict, e.g. var_d16.pth)")
    s.add_argument("--vae-ckpt", help="VQVAE checkpoint (state dict, e.g. vae_ch160v4096z32.pth)")
    s.add_argument("--labels", required=True, help="comma-separated class ids, e.g. 207,360")
    s.add_argument("--num-per-class", type=int, default=1, help="images per label (one grid row per label)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance strength")
    s.add_argument("--top-k", type=int, default=None,
                   help="top-k filtering (0: off; default 900, the official setting, capped at the vocabulary size)")
    s.add_argument("--top-p", type=float, default=0.96, help="top-p filtering (0: off)")
    s.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax-weighted codes (visualisation)")
    s.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    s.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="VAR compute dtype")
    s.add_argument("--out", default="grid.png", help="output PNG path")
    b = sub.add_parser("bench", help="end-to-end sampling benchmark: official eager loop, torch.compile, fastvar")
    b.add_argument("--models", nargs="+", default=["d16", "d20", "d24", "d30", "d36"])
    b.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    b.add_argument("--providers", nargs="+", default=["eager", "compile", "fastvar"],
                   choices=["eager", "compile", "fastvar"])
    b.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    b.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    b.add_argument("--out-dir", default=None, help="folder for the CSV (default: print only)")
    b.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the code path, timings mean nothing")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            print(info_text())
        elif args.command == "sample":
            print(cmd_sample(args))
        elif args.command == "bench":
            print(cmd_bench(args))
    except CliError as e:
        print(f"fastvar {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
