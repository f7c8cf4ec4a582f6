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


def _user_errors():
    from fastvar.generate import GenerateError
    return (CliError, GenerateError)


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
    """``(vae, var, info)``: the checkpoints given, or the bundled digits model (:func:`fastvar.pretrained.load_models`)."""
    from fastvar.pretrained import load_models as load
    if bool(args.var_ckpt) != bool(args.vae_ckpt):
        raise CliError("pass both --var-ckpt and --vae-ckpt, or neither (the bundled digits model)")
    device, dtype = _device(args.device), DTYPES[args.dtype]
    try:
        return load(args.var_ckpt, args.vae_ckpt, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None


def _upscale(images: torch.Tensor, factor: int) -> torch.Tensor:
    return images if factor == 1 else torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")


def cmd_sample(args) -> str:
    from fastvar.sampler import Sampler
    from fastvar.utils.files import check_writable
    from fastvar.utils.images import make_grid, save_png
    from fastvar.utils.progress import Progress
    try:
        out = check_writable(args.out, "--out")
    except ValueError as e:
        raise CliError(str(e)) from None
    for name in ("num_per_class", "batch_size", "display_scale"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    vae, var, info = load_models(args)
    if args.labels is None and info["class_names"] is None:
        raise CliError("--labels is required with checkpoints (comma-separated class ids, e.g. 207,360)")
    labels = parse_labels(args.labels, var.num_classes) if args.labels is not None else list(range(var.num_classes))
    per_class = args.num_per_class or info.get("num_per_class", 8)
    settings = dict(cfg=info["cfg"] if args.cfg is None else args.cfg,
                    top_k=info["top_k"] if args.top_k is None else args.top_k,
                    top_p=info["top_p"] if args.top_p is None else args.top_p, more_smooth=args.more_smooth)
    scale = args.display_scale or info["display_scale"]
    all_labels = torch.tensor([lab for lab in labels for _ in range(per_class)], device=var.lvl_1L.device)
    rng = torch.Generator(device=var.lvl_1L.device).manual_seed(args.seed)
    batches = torch.split(all_labels, args.batch_size)
    prog = Progress(len(all_labels), "[sample]", enabled=len(batches) > 1 and not args.quiet)
    finals, per_scale = [], None
    try:
        sampler = Sampler(var, vae, dtype=var.head.weight.dtype, cuda_graphs=var.lvl_1L.device.type == "cuda")
        for batch in batches:
            steps = list(sampler.stream(batch, generator=rng, **settings))
            if args.stream:
                previews = [_upscale(st.preview().float().cpu(), scale) for st in steps]
                per_scale = previews if per_scale is None else [torch.cat(x) for x in zip(per_scale, previews)]
                finals.append(previews[-1])
            else:
                finals.append(_upscale(steps[-1].preview().float().cpu(), scale))
            prog.update(sum(len(f) for f in finals))
    except (TypeError, ValueError) as e:
        raise CliError(str(e)) from None
    images = torch.cat(finals)
    ncol = per_class if per_class > 1 else None
    path = save_png(make_grid(images, ncol=ncol), out)
    if len(batches) > 1 and not args.quiet:
        prog.close(f"{len(images)} images")
    lines = [f"wrote {len(images)} samples ({images.shape[-2] // scale}x{images.shape[-1] // scale} px"
             + (f", shown x{scale}" if scale > 1 else "") + f") of classes {labels} to {path}"]
    if args.stream:
        stem, ext = os.path.splitext(path)
        for si, imgs in enumerate(per_scale):
            lines.append(f"scale {si} preview: {save_png(make_grid(imgs, ncol=ncol), f'{stem}_scale{si}{ext}')}")
    return "\n".join(lines)


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
    s.add_argument("--var-ckpt", help="VAR checkpoint (state dict, e.g. var_d16.pth); default: the bundled digits model")
    s.add_argument("--vae-ckpt", help="VQVAE checkpoint (state dict, e.g. vae_ch160v4096z32.pth)")
    s.add_argument("--labels", default=None,
                   help="comma-separated class ids, e.g. 207,360 (default with the bundled model: all ten digits)")
    s.add_argument("--num-per-class", type=int, default=None,
                   help="images per label, one grid row per label (default: 8 for the bundled model, else 1)")
    s.add_argument("--batch-size", type=int, default=64, help="images sampled at once (a progress bar shows batches)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance strength (default: the model's; 1.5 for released checkpoints)")
    s.add_argument("--top-k", type=int, default=None,
                   help="top-k filtering, 0 = off (default: the model's; 900 for released checkpoints)")
    s.add_argument("--top-p", type=float, default=None,
                   help="top-p filtering, 0 = off (default: the model's; 0.96 for released checkpoints)")
    s.add_argument("--stream", action="store_true",
                   help="also save the preview after every scale (OUT_scale0.png ...): the coarse-to-fine pyramid")
    s.add_argument("--display-scale", type=int, default=None,
                   help="nearest-neighbour upscaling of the saved images (default: 4 for 16-px digits, else 1)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax-weighted codes (visualisation)")
    s.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    s.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="VAR compute dtype")
    s.add_argument("--out", default="grid.png", help="output PNG path")
    from fastvar.generate import add_parser as add_generate
    add_generate(sub)
    b = sub.add_parser("bench", help="end-to-end sampling benchmark: official eager loop, torch.compile, fastvar")
    b.add_argument("--models", nargs="+", default=["d16", "d20", "d24", "d30", "d36"])
    b.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    b.add_argument("--providers", nargs="+", default=["eager", "compile", "fastvar"],
                   choices=["eager", "compile", "fastvar", "fastvar-fused", "fastvar-generate"])
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
        elif args.command == "generate":
            from fastvar.generate import cmd_generate
            line = cmd_generate(args)
            if line:
                print(line)
    except _user_errors() as e:
        print(f"fastvar {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
