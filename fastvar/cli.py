"""The ``fastvar`` command (also ``python -m fastvar``): ``fastvar info``, ``fastvar sample``, ``fastvar bench``,
``fastvar generate`` (in :mod:`fastvar.generate`).

Every user error ends the command with one line naming the argument (``fastvar sample: error: --seed ...``) and
exit status 2. The checks that a command needs before its work starts (seed, output path and format, backend,
memory) are functions of their own below, for every command that samples (``sample`` and ``generate``; the memory
estimate, :func:`sample_memory`, is VAR's: ``generate`` with an Infinity checkpoint has none).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from typing import Collection, Dict, List, Optional, Sequence

import torch

from fastvar.utils.user_error import UserError, check_seed_option


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
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
            devices.append(torch.device("cuda"))
        else:
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            lines.append(f"no GPU: {why}")
    except Exception as e:               # a broken driver: report it, never crash `info`
        lines.append(f"no GPU: querying CUDA failed ({type(e).__name__}: {e})")
    try:
        forced_backend()        # raises on a wrong or unusable FASTVAR_BACKEND
    except ValueError as e:
        lines = lines + [f"warning: {e}; the ops below raise this error until it is fixed"]
    lines.append(f"{ENV_VAR}={os.environ.get(ENV_VAR) or '(auto)'}  "
                 f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    lines.append("backends:")
    for backend in BACKENDS:
        for dev in devices:
            try:
                why = unavailable_reason(backend, dev)
            except Exception as e:       # report, never crash `info`
                why = f"{type(e).__name__}: {e}"
            lines.append(f"  {backend:7s} on {dev.type:4s}: " + ("usable" if why is None else f"not usable: {why}"))
    lines.append("ops (backend chosen per device):")
    for op, impls in OPS.items():
        chosen = []
        for dev in devices:
            try:
                chosen.append(f"{dev.type}={selected_backend(op, impls, dev)}")
            except Exception as e:       # a wrong FASTVAR_BACKEND, a forced backend that cannot run here
                chosen.append(f"{dev.type}=error ({e})")
        lines.append(f"  {op:24s} {', '.join(chosen)}   [implemented: {', '.join(impls)}]")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- checks shared by sampling commands

SEED_HELP = ("seeds one torch.Generator on the device for the whole run (torch.Generator.manual_seed): every "
             "batch draws from it in turn, so the same --seed and --batch-size give the same pictures; "
             "an int in [0, 2**63)")


def check_seed_arg(seed, name: str = "--seed") -> int:
    """``seed`` in ``[0, 2**63)``, else a :class:`UserError` that says how seeds map."""
    return check_seed_option(seed, name, "it seeds one torch.Generator for the whole run (every batch draws from it "
                                         "in turn), so each value gives its own pictures")


def check_positive_args(args, names: Sequence[str]) -> None:
    """Every ``args.<name>`` that is set is an int >= 1 (``--num-per-class 0`` is an error, not an empty grid)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_output_path(path: str, name: str = "--out") -> str:
    """The absolute path of an image to write after the work: its folder exists and takes a new file (tried, not
    assumed), and its extension names a format fastvar writes (``.png``; others through Pillow). Checked before
    the work, so a long run never ends in a failed write."""
    from fastvar.utils.files import check_writable
    from fastvar.utils.images import image_format
    try:
        out = check_writable(path, name, probe=True)
        image_format(out)
    except ValueError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(name) else f"{name}: {msg}") from None
    return out


def write_picture(image: torch.Tensor, path: str, name: str = "--out") -> str:
    """Write ``image`` ``(3, H, W)`` in [0, 1] to ``path`` (atomically, in its extension's format); a failure (disk
    full, the folder gone) is one line naming the argument, and leaves no partial file."""
    from fastvar.utils.images import save_image
    check_finite_images(image, name)
    try:
        return save_image(image, path)
    except OSError as e:
        raise UserError(f"{name}: could not write {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UserError(f"{name}: {e}") from None


def check_finite_images(images: torch.Tensor, what: str) -> None:
    """NaN or inf pixels would be written as black: an error instead, and nothing is written."""
    if not bool(torch.isfinite(images).all()):
        raise UserError(f"{what}: the images hold NaN or inf (a diverged model or an overflow in its dtype); "
                       f"nothing was written")


def check_backend(device: torch.device) -> None:
    """``FASTVAR_BACKEND`` names a backend that can run on ``device`` (checked before loading anything)."""
    from fastvar.ops._backend import ENV_VAR, forced_backend, unavailable_reason
    try:
        forced = forced_backend()
    except ValueError as e:
        raise UserError(f"environment variable {e}") from None
    if forced is not None:
        why = unavailable_reason(forced, device)
        if why is not None:
            raise UserError(f"environment variable {ENV_VAR}={forced} cannot run on {device.type} here: {why}; "
                           f"unset it (automatic choice) or set it to eager")


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes free for a new allocation on ``device`` (host: MemAvailable, else physical memory), or None."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def sample_memory(var, vae, n_images: int, batch: int, scale: int, pictures_per_image: int) -> Dict[str, int]:
    """Estimated peak bytes of ``fastvar sample``: ``pictures`` on the host (float32 images shown ``scale`` times
    larger, ``pictures_per_image`` of them per image (1, or 1 + scales with --stream/--pyramid), once as images
    and once in a grid, plus the encoded bytes); ``batch`` on the model's device (KV caches, noise, activations
    and the decoder's feature maps of one batch). An estimate to refuse what cannot fit before allocating it, not
    an accounting."""
    sch = var.schedule
    down = getattr(getattr(vae, "encoder", None), "downsample_ratio", 16)
    h_img, w_img = sch.hws[-1][0] * down, sch.hws[-1][1] * down
    shown = 3 * (h_img * scale + 2) * (w_img * scale + 2)
    pictures = n_images * pictures_per_image * shown * (4 + 4 + 1)
    B = min(batch, n_images)
    elt = next(p.element_size() for p in var.parameters() if p.is_floating_point())
    kv = 2 * var.depth * 2 * B * sch.L * var.C * elt
    act = 2 * B * max(sch.lens) * (var.C * (4 + 12) * elt + var.V * 4 * 3)
    ch = getattr(getattr(vae, "encoder", None), "ch", 128)
    decoder = B * 4 * ch * h_img * w_img * 4 * 3
    return {"pictures": pictures, "batch": kv + act + decoder + B * max(sch.lens) * var.V * 4}


def check_memory(need: Dict[str, int], device: torch.device, pictures_what: str, batch_what: str) -> None:
    """:class:`UserError` when :func:`sample_memory`'s estimate exceeds what is free: ``pictures_what`` /
    ``batch_what`` name the options that set each part (e.g. ``"--num-per-class 9999 x 10 labels at
    --display-scale 4"``), and the message says to lower them."""
    host = available_memory(torch.device("cpu"))
    if host is not None and need["pictures"] > host:
        raise UserError(f"{pictures_what}: the pictures need about {_gib(need['pictures'])} of memory, "
                       f"{_gib(host)} is available; lower them")
    free = available_memory(device) if device.type == "cuda" else host
    if free is not None and need["batch"] + (0 if device.type == "cuda" else need["pictures"]) > free:
        raise UserError(f"{batch_what}: sampling one batch needs about {_gib(need['batch'])} on {device.type}, "
                       f"{_gib(free)} is available; lower it")


# the Python names that errors from the library start with, each the command's option --name (_ written -)
OPTION_NAMES = ("cfg", "top_k", "top_p", "dtype", "labels", "device")


def as_option_error(e: Exception, names: Collection[str] = OPTION_NAMES) -> "UserError":
    """A library error (``top_k must be <= ...``) as the command's, led by the option it is about
    (``--top-k: top_k must be <= ...``); ``names``: the library's names that are the command's options."""
    msg = str(e)
    word = re.match(r"\w+", msg)
    if word and word.group(0) in names:
        msg = f"--{word.group(0).replace('_', '-')}: {msg}"
    return UserError(msg)


def sample_progress(total: int, quiet: bool):
    """The progress bar of a sampling command: one step per scale of every batch, on a terminal only, shown
    once the run has taken half a second (a single long batch too)."""
    from fastvar.utils.progress import Progress
    return Progress(total, "[sample]", enabled=not quiet, delay=0.5)


# ---------------------------------------------------------------------------- sample

def parse_labels(text: str, num_classes: int) -> List[int]:
    """``"207,360"`` -> ``[207, 360]``; a :class:`UserError` naming ``--labels`` for anything else."""
    labels = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not re.fullmatch(r"[+-]?[0-9]+", part):     # not int(): it takes "1_0", and "1.0" is not a class
            raise UserError(f"--labels must be comma-separated class ids (integers), got {part!r} in {text!r}")
        lab = int(part)
        if not 0 <= lab < num_classes:
            raise UserError(f"--labels: class {lab} is out of range; this model has classes 0..{num_classes - 1}")
        labels.append(lab)
    if not labels:
        raise UserError(f"--labels must name at least one class, got {text!r}")
    return labels


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

def load_models(args):
    """``(vae, var, info)``: the checkpoints given, or the bundled digits model (:func:`fastvar.pretrained.load_models`)."""
    from fastvar.pretrained import load_models as load
    device, dtype = _device(args.device), DTYPES[args.dtype]
    try:
        return load(args.var_ckpt, args.vae_ckpt, device=device, dtype=dtype, names=("--var-ckpt", "--vae-ckpt"))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None


def _upscale(images: torch.Tensor, factor: int) -> torch.Tensor:
    return images if factor == 1 else torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")


def _grid(images: List[torch.Tensor], total: int, ncol: Optional[int]) -> torch.Tensor:
    """The grid of ``total`` cells, the images done so far first and blank (white) cells for the rest, so that a
    preview written while sampling has its final size from the first batch on."""
    from fastvar.utils.images import make_grid
    done = torch.cat(images)
    if len(done) < total:
        done = torch.cat([done, done.new_ones(total - len(done), *done.shape[1:])])
    return make_grid(done, ncol=ncol)


def cmd_sample(args) -> str:
    from fastvar.sampler import Sampler
    from fastvar.settings import resolve_settings
    from fastvar.utils.images import make_grid
    out = check_output_path(args.out, "--out")
    pyramid = check_output_path(args.pyramid, "--pyramid") if args.pyramid else None
    check_positive_args(args, ("num_per_class", "batch_size", "display_scale"))
    seed = check_seed_arg(args.seed)
    device = _device(args.device)
    check_backend(device)
    vae, var, info = load_models(args)
    if args.labels is None and info["class_names"] is None:
        raise UserError("--labels is required with checkpoints (comma-separated class ids, e.g. 207,360)")
    labels = parse_labels(args.labels, var.num_classes) if args.labels is not None else list(range(var.num_classes))
    per_class = args.num_per_class or info.get("num_per_class", 8)
    scale = args.display_scale or info["display_scale"]
    S = len(var.schedule)
    stem, ext = os.path.splitext(out)
    stream_paths = [check_output_path(f"{stem}_scale{si}{ext}", "--out (with --stream)") for si in range(S)] \
        if args.stream else []
    try:
        settings = resolve_settings(var, args.cfg, args.top_k, args.top_p, args.more_smooth)
    except (TypeError, ValueError) as e:
        raise as_option_error(e) from None
    n = len(labels) * per_class
    previews = args.stream or pyramid is not None
    check_memory(sample_memory(var, vae, n, args.batch_size, scale, 1 + (S if previews else 0)), device,
                 f"--num-per-class {per_class} x {len(labels)} labels at --display-scale {scale}"
                 + (" with --stream/--pyramid" if previews else ""), f"--batch-size {args.batch_size}")

    all_labels = torch.tensor([lab for lab in labels for _ in range(per_class)], device=var.lvl_1L.device)
    rng = torch.Generator(device=var.lvl_1L.device).manual_seed(seed)
    batches = torch.split(all_labels, args.batch_size)
    ncol = per_class if per_class > 1 else None
    prog = sample_progress(len(batches) * S, args.quiet)
    finals: List[torch.Tensor] = []
    per_scale: List[List[torch.Tensor]] = [[] for _ in range(S)]
    try:
        sampler = Sampler(var, vae, dtype=var.head.weight.dtype, cuda_graphs=var.lvl_1L.device.type == "cuda")
        for bi, batch in enumerate(batches):
            for step in sampler.stream(batch, generator=rng, cfg=settings.cfg, top_k=settings.top_k,
                                       top_p=settings.top_p, more_smooth=settings.more_smooth):
                if previews or step.is_last:
                    image = _upscale(step.preview().float().cpu(), scale)
                    if previews:
                        per_scale[step.index].append(image)
                    if args.stream:      # written as its scale finishes: the cells of later batches stay blank
                        write_picture(_grid(per_scale[step.index], n, ncol), stream_paths[step.index],
                                      "--out (with --stream)")
                    if step.is_last:
                        finals.append(image)
                prog.update(bi * S + step.index + 1, f"batch {bi + 1}/{len(batches)}")
    except (TypeError, ValueError) as e:
        raise as_option_error(e) from None
    except torch.OutOfMemoryError:
        raise UserError(f"--batch-size {args.batch_size}: out of memory while sampling; lower --batch-size") from None
    images = torch.cat(finals)
    path = write_picture(make_grid(images, ncol=ncol), out, "--out")
    if not args.quiet:
        prog.close(f"{len(images)} images")
    lines = [f"wrote {len(images)} samples ({images.shape[-2] // scale}x{images.shape[-1] // scale} px"
             + (f", shown x{scale}" if scale > 1 else "") + f") of classes {labels} to {path}"]
    for si, p in enumerate(stream_paths):
        lines.append(f"scale {si} preview: {p}")
    if pyramid is not None:
        rows = torch.cat([torch.cat(imgs) for imgs in per_scale])       # one row per scale, coarse to fine
        lines.append(f"coarse-to-fine pyramid ({S} scales x {n} images): "
                     f"{write_picture(make_grid(rows, ncol=n), pyramid, '--pyramid')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- bench

BENCH_COLUMNS = """columns: model, B = batch size, provider, ms = one batch's tokens (median of --reps),
  img/s = B / time, xN = speedup over eager, N x the floor = ms over the higher of two lower bounds on it:
  FLOPs = the transformer's FLOPs at this device's measured dense GEMM rate, weights = its weights read at the
  measured copy bandwidth (once per scale; those applied to the class once), decode = ms of the VQVAE decode of the
  batch (not in ms);
  'per scale' lines: fastvar's ms of each scale, coarse to fine.
providers: eager = the official sampling loop in PyTorch; compile = the same with its blocks under torch.compile;
  fastvar = fastvar.Sampler; fastvar-fused = fastvar.Sampler(fused_step_conv=True)."""


def cmd_bench(args) -> str:
    from fastvar.benchmark import MODELS, run_benchmark
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        raise UserError(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
    if any(b < 1 for b in args.batches):
        raise UserError(f"--batches must be positive, got {args.batches}")
    if args.reps < 1:
        raise UserError(f"--reps must be >= 1 (timed repetitions; the median is reported), got {args.reps}")
    if args.profile and not args.out_dir:
        raise UserError("--profile: the tables go to --out-dir; name one")
    check_backend(torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if args.out_dir:
        from fastvar.utils.files import check_writable
        try:
            os.makedirs(args.out_dir, exist_ok=True)
            check_writable(os.path.join(args.out_dir, "sampling.csv"), "--out-dir", probe=True)
        except OSError as e:
            raise UserError(f"--out-dir: cannot create {args.out_dir}: {e.strerror or e}") from None
        except ValueError as e:
            raise UserError(str(e)) from None
    print(BENCH_COLUMNS)
    try:
        rows = run_benchmark(models=args.models, batches=args.batches, providers=args.providers,
                             dtype=DTYPES[args.dtype], reps=args.reps, out_dir=args.out_dir, smoke=args.smoke,
                             profile=args.profile)
    except RuntimeError as e:
        raise UserError(str(e)) from None
    return f"{len(rows)} measurements"


# ---------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    from fastvar import __version__
    p = argparse.ArgumentParser(prog="fastvar", description="fast kernels and sampler for VAR")
    p.add_argument("--version", action="version", version=f"fastvar {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, usable backends and why not")
    s = sub.add_parser("sample", help="sample class-conditional images into a picture grid")
    s.add_argument("--var-ckpt", help="VAR checkpoint (state dict, e.g. var_d16.pth); default: none, the bundled "
                                      "digits model (pass both --var-ckpt and --vae-ckpt, or neither)")
    s.add_argument("--vae-ckpt", help="VQVAE checkpoint (state dict, e.g. vae_ch160v4096z32.pth); default: none, "
                                      "the bundled digits model")
    s.add_argument("--labels", default=None,
                   help="comma-separated class ids, e.g. 207,360 (default with the bundled model: all ten digits; "
                        "required with checkpoints)")
    s.add_argument("--num-per-class", type=int, default=None,
                   help="images per label, one grid row per label (default: 8 for the bundled model, else 1)")
    s.add_argument("--batch-size", type=int, default=64,
                   help="images sampled at once (default: 64); the seed's pictures depend on it")
    s.add_argument("--seed", type=int, default=0, help=f"random seed (default: 0): {SEED_HELP}")
    s.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance strength (default: the model's; 2 for the bundled model, 1.5 "
                        "for released checkpoints)")
    s.add_argument("--top-k", type=int, default=None,
                   help="top-k filtering, 0 = off (default: the model's; 0 for the bundled model, 900 (at most "
                        "the vocabulary) for released checkpoints)")
    s.add_argument("--top-p", type=float, default=None,
                   help="top-p filtering, 0 = off (default: the model's; 0 for the bundled model, 0.96 for released "
                        "checkpoints)")
    s.add_argument("--stream", action="store_true",
                   help="also write the preview after every scale, each as its scale finishes (OUT_scale0.png, "
                        "...; default: off)")
    s.add_argument("--pyramid", default=None, metavar="PATH",
                   help="also write the coarse-to-fine picture: one row per scale, one column per image "
                        "(default: none; README's docs/digits_pyramid.png is one)")
    s.add_argument("--display-scale", type=int, default=None,
                   help="nearest-neighbour upscaling of the saved images (default: 4 for 16-px digits, else 1)")
    s.add_argument("--quiet", action="store_true",
                   help="no progress bar (default: off; the bar is drawn on a terminal only)")
    s.add_argument("--more-smooth", action="store_true",
                   help="Gumbel-softmax-weighted codes, the official visualisation option (default: off)")
    s.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N] (default: auto)")
    s.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="VAR compute dtype (default: float32)")
    s.add_argument("--out", default="grid.png",
                   help="output picture (default: grid.png); .png, or another format Pillow writes (.jpg, .webp, "
                        "...) if Pillow is installed")
    from fastvar.generate import add_parser as add_generate
    add_generate(sub)
    b = sub.add_parser("bench", help="end-to-end sampling benchmark: official eager loop, torch.compile, fastvar")
    b.add_argument("--models", nargs="+", default=["d16", "d20", "d24", "d30", "d36"],
                   help="released model sizes, random weights (default: d16 d20 d24 d30 d36)")
    b.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64], help="batch sizes (default: 1 8 64)")
    b.add_argument("--providers", nargs="+", default=["eager", "compile", "fastvar"],
                   choices=["eager", "compile", "fastvar", "fastvar-fused", "fastvar-generate"],
                   help="implementations side by side (default: eager compile fastvar)")
    b.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="compute dtype (default: bfloat16)")
    b.add_argument("--reps", type=int, default=5, help="timed repetitions, median reported (default: 5)")
    b.add_argument("--out-dir", default=None, help="folder for the CSV (default: none, print only)")
    b.add_argument("--smoke", action="store_true",
                   help="tiny model on CPU: checks the code path, timings mean nothing (default: off)")
    b.add_argument("--profile", action="store_true",
                   help="also one call of each provider under torch.profiler: its ops and kernels by device time, "
                        "in --out-dir/profile_<model>_B<batch>_<provider>.txt (default: off)")
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
    except UserError as e:
        print(f"fastvar {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:        # Ctrl-C: one line, the shell's status for SIGINT; no partial file is left
        print(f"fastvar {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
