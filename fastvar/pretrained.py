"""Models shipped inside the fastvar package: sampling works with no download.

``load_digits()`` returns a small class-conditional VQVAE + VAR pair trained with
``python -m fastvar.train.digits`` on scikit-learn's 8x8 handwritten digits (16x16 RGB samples,
10 classes "0".."9"); see ``fastvar/weights/README.md`` for the command, its runtime and the
measured sample quality. The models are the same ``VQVAE`` / ``VAR`` classes as the released
ImageNet checkpoints, with small hyper-parameters.

    from fastvar.pretrained import load_digits, sample_digits
    vae, var, info = load_digits()
    images = sample_digits(var, info, labels=[0, 1, 2], num_per_class=4, seed=0)   # (12, 3, 16, 16) in [0, 1]
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from fastvar.labels import as_label_tensor, int_scalar
from fastvar.models import VAR, VQVAE
from fastvar.models.build import vae_var_from_state_dicts
from fastvar.settings import SamplingSettings, default_settings
from fastvar.utils.files import check_finite_tensors, load_tensors

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DIGITS_PATH = os.path.join(WEIGHTS_DIR, "digits.pt")
DIGITS_FORMAT = "fastvar.digits/1"


def _tuples(x: Any) -> Any:
    """Lists back to tuples (schedules, ``ch_mult``), recursively: configs compare and hash as built."""
    if isinstance(x, (list, tuple)):
        return tuple(_tuples(v) for v in x)
    return x


def read_digits_file(path: Optional[Union[str, os.PathLike]] = None) -> Dict[str, Any]:
    """The bundled weights file as a dict ``{"config", "vae", "var", "sampling"}`` (``torch.load`` with
    ``weights_only=True``); ``FileNotFoundError`` / ``ValueError`` saying what is wrong."""
    path = DIGITS_PATH if path is None else os.fspath(path)
    try:
        obj = load_tensors(path, "digits weights")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (reinstall fastvar, or recreate them with python -m fastvar.train.digits "
                                f"--out runs/digits --export {DIGITS_PATH})") from None
    if not isinstance(obj, dict) or obj.get("format") != DIGITS_FORMAT or not all(
            isinstance(obj.get(k), dict) for k in ("config", "vae", "var", "sampling")):
        raise ValueError(f"digits weights {path} are not a {DIGITS_FORMAT} file "
                         f"(a dict with config, vae, var and sampling)")
    for part in ("var", "vae"):
        check_finite_tensors(obj[part], f"digits weights {path} ({part})")
    return obj


def load_digits(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                path: Optional[Union[str, os.PathLike]] = None) -> Tuple[VQVAE, VAR, Dict[str, Any]]:
    """The bundled digits models, in eval mode on ``device``.

    Args:
        device: where to put both models.
        dtype: the VAR's weights dtype (the VQVAE stays float32, like ``load_vae_var``).
        path: another file in the same format (default: ``fastvar/weights/digits.pt``).
    Returns:
        ``(vae, var, info)``. ``info`` holds the recommended sampling settings ``cfg``, ``top_k``,
        ``top_p``; ``class_names`` (``"0"`` .. ``"9"``, class id = digit); ``num_classes``;
        ``image_size`` (16: samples are ``(B, 3, 16, 16)``); ``display_scale`` (4: a nearest-neighbour
        upscale that makes them 64x64 on screen); ``path``; ``config`` (the training options, the
        exact command and its runtime).
    """
    obj = read_digits_file(path)
    cfg = obj["config"]
    vae_cfg = {k: _tuples(v) for k, v in cfg["vae"].items()}
    var_cfg = {k: _tuples(v) for k, v in cfg["var"].items()}
    vae, var = vae_var_from_state_dicts(obj["var"], obj["vae"], device=device, dtype=dtype,
                                        var_config=var_cfg, vae_config=vae_cfg)
    s = obj["sampling"]
    # the recommended settings travel with the model: fastvar.Sampler(var, vae).sample(...) uses them
    var.recommended_settings = SamplingSettings.checked(s["cfg"], s["top_k"], s["top_p"], V=var.V)
    info = dict(cfg=float(s["cfg"]), top_k=int(s["top_k"]), top_p=float(s["top_p"]),
                class_names=list(cfg["class_names"]), num_classes=var.num_classes,
                image_size=int(cfg["image_size"]), display_scale=max(1, 64 // int(cfg["image_size"])),
                path=os.path.abspath(path or DIGITS_PATH),
                config=dict(cfg["train"], command=cfg.get("command"), train_seconds=cfg.get("train_seconds")))
    return vae, var, info


def digit_labels(labels: Union[int, str, Sequence[Union[int, str]]], info: Dict[str, Any]) -> List[int]:
    """Class ids from ints or class names (``7``, ``"7"``, ``[0, "3"]``, ``"0,3,7"``);
    ``ValueError`` naming the valid classes for anything else."""
    names = list(info["class_names"])
    if isinstance(labels, str):
        labels = [t.strip() for t in labels.split(",") if t.strip()]
    elif int_scalar(labels) is not None:
        labels = [int_scalar(labels)]
    elif not isinstance(labels, (list, tuple)):
        labels = as_label_tensor(labels, "labels").tolist()     # tensors and numpy arrays: integers only
    out = []
    for i, lab in enumerate(labels):
        if not isinstance(lab, str):
            value = int_scalar(lab)
            if value is None:
                raise TypeError(f"labels must be class ids (integers) or class names, got {lab!r} "
                                f"({type(lab).__name__}) at labels[{i}]")
            lab = value
        if isinstance(lab, str):
            if lab not in names:
                raise ValueError(f"unknown label {lab!r}: this model's classes are {', '.join(names)}")
            lab = names.index(lab)
        if not 0 <= lab < len(names):
            raise ValueError(f"label {lab} is out of range: this model has classes 0..{len(names) - 1} "
                             f"({', '.join(names)})")
        out.append(int(lab))
    if not out:
        raise ValueError("labels must name at least one class")
    return out


@torch.no_grad()
def sample_digits(var: VAR, info: Dict[str, Any], labels: Union[int, str, Sequence[Union[int, str]]] = None,
                  num_per_class: int = 1, seed: Optional[int] = 0, cfg: Optional[float] = None,
                  top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """``num_per_class`` samples of every label (default all ten digits), label-major:
    ``(len(labels) * num_per_class, 3, 16, 16)`` float in [0, 1]. ``cfg`` / ``top_k`` / ``top_p``
    default to the recommended ``info`` settings; ``seed`` seeds the sampler (None: the global RNG)."""
    labels = digit_labels(list(range(info["num_classes"])) if labels is None else labels, info)
    if isinstance(num_per_class, bool) or not isinstance(num_per_class, int) or num_per_class < 1:
        raise ValueError(f"num_per_class must be an int >= 1, got {num_per_class!r}")
    label_B = torch.tensor([c for c in labels for _ in range(num_per_class)], device=var.lvl_1L.device)
    return var.autoregressive_infer_cfg(
        B=len(label_B), label_B=label_B, g_seed=seed,
        cfg=info["cfg"] if cfg is None else cfg,
        top_k=info["top_k"] if top_k is None else top_k,
        top_p=info["top_p"] if top_p is None else top_p)


def _read_checkpoint(path: str, what: str, name: str, other: str) -> Dict[str, torch.Tensor]:
    """The state dict of the ``what`` ("VAR" / "VQVAE") checkpoint at ``path``; errors lead with ``name`` (the
    argument or option that gave the path) and say when it is the other model's checkpoint (``other``)."""
    from fastvar.models.build import load_checkpoint
    from fastvar.models.families import checkpoint_family
    try:
        sd = load_checkpoint(path, what)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from None
    swapped = "VQVAE" if what == "VAR" else "VAR"
    if checkpoint_family(sd) == swapped:
        raise ValueError(f"{name}: {path} is a {swapped} checkpoint, not a {what} one; did you swap {name} and {other}?")
    return sd


def load_models(var_ckpt: Optional[str] = None, vae_ckpt: Optional[str] = None, device="cpu",
                dtype: torch.dtype = torch.float32, names: Tuple[str, str] = ("var_ckpt", "vae_ckpt")
                ) -> Tuple[VQVAE, VAR, Dict[str, Any]]:
    """``(vae, var, info)`` for sampling: released checkpoints, or the bundled digits model when neither path is
    given. ``info``: the model's sampling defaults ``cfg``, ``top_k``, ``top_p``
    (:func:`fastvar.settings.default_settings`) and the display defaults ``display_scale``, ``class_names``,
    ``num_per_class``. ``FileNotFoundError`` / ``ValueError`` leading with the name of the path at fault
    (``names``: how the caller calls the two paths, e.g. the CLI's options)."""
    if not var_ckpt and not vae_ckpt:
        try:
            return load_digits(device=device, dtype=dtype)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"the bundled digits model: {e}") from None
    if not (var_ckpt and vae_ckpt):
        raise ValueError(f"pass both {names[0]} and {names[1]}, or neither (the bundled digits model)")
    var_sd = _read_checkpoint(var_ckpt, "VAR", *names)
    vae_sd = _read_checkpoint(vae_ckpt, "VQVAE", *names[::-1])
    try:
        vae, var = vae_var_from_state_dicts(var_sd, vae_sd, device=device, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{names[0]} {var_ckpt} with {names[1]} {vae_ckpt}: {e}") from None
    d = default_settings(var)
    return vae, var, dict(cfg=d.cfg, top_k=d.top_k, top_p=d.top_p, display_scale=1, class_names=None,
                          num_per_class=1)
