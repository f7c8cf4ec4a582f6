"""Argument checks shared by the ops: each error names the argument, what was expected and what came."""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from fastvar.reference.quantize import PhiParams

# the dtypes the ops take for floating inputs (float64 for the reference's own checks)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t, ndim: Optional[int] = None, dtypes: Optional[Iterable[torch.dtype]] = None,
                 shape: Optional[Sequence[Optional[int]]] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != a for s, a in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor], what: str = "dtype,device") -> None:
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if "dtype" in what and t.dtype != first.dtype:
            raise TypeError(f"{name} must have the dtype of {first_name} ({first.dtype}), got {t.dtype}")
        if "device" in what and t.device != first.device:
            raise ValueError(f"{name} must be on the device of {first_name} ({first.device}), got {t.device}")


def check_scale_lens(scale_lens, L: int, name: str = "scale_lens") -> tuple:
    try:
        lens = tuple(int(n) for n in scale_lens)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of ints, got {scale_lens!r}") from None
    if any(n != m for n, m in zip(scale_lens, lens)):      # 2.5 is not a token count, nor is it 2
        raise TypeError(f"{name} must hold whole token counts, got {list(scale_lens)}")
    if not lens or any(n < 1 for n in lens):
        raise ValueError(f"{name} must be a non-empty sequence of positive token counts, got {list(lens)}")
    if sum(lens) != L:
        raise ValueError(f"sum({name}) must equal the sequence length L={L}, got sum={sum(lens)} for {list(lens)}")
    return lens


def check_finite_scalar(name: str, x, low: Optional[float] = None, high: Optional[float] = None) -> float:
    if isinstance(x, (str, bytes, bool)):       # "1.5" and True are not numbers here, though float() takes them
        raise TypeError(f"{name} must be a real number, got {x!r} ({type(x).__name__})")
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {x!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if (low is not None and x < low) or (high is not None and x > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {x}")
    return x


def check_int(name: str, x, low: Optional[int] = None) -> int:
    """``x`` as an int: Python and numpy integers only (``2.5`` or ``2.0`` is not a count or an offset, ``True``
    is not 1); ``TypeError`` / ``ValueError`` naming ``name`` otherwise."""
    import numbers
    if isinstance(x, torch.SymInt):          # a traced size under torch.compile
        return x
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {x!r} ({type(x).__name__})")
    x = int(x)
    if low is not None and x < low:
        raise ValueError(f"{name} must be >= {low}, got {x}")
    return x


def _byte_span(t: torch.Tensor) -> Tuple[int, int]:
    """``[first, last)`` bytes of ``t``'s elements in its storage (strides are never negative in torch)."""
    start = t.data_ptr()
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) * t.element_size()
    return start, start + last + t.element_size()


def _hits(delta: int, dims: List[Tuple[int, int]]) -> bool:
    """Whether ``delta = sum(j_i * stride_i)`` for some ``|j_i| < size_i``: ``dims`` are (stride, size), largest
    stride first, each stride larger than the reach of all smaller ones (so at most two digits fit per level)."""
    if not dims:
        return delta == 0
    (stride, size), rest = dims[0], dims[1:]
    reach = sum((n - 1) * st for st, n in rest)
    lo, hi = -((reach - delta) // stride), (delta + reach) // stride      # ceil((delta-reach)/s), floor(...)
    return any(_hits(delta - j * stride, rest) for j in range(max(lo, 1 - size), min(hi, size - 1) + 1))


def may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if ``a`` and ``b`` can share an element. Exact for two views of one layout (same shape and strides,
    e.g. the k and v halves of one ``(B, L, 2, H, D)`` buffer); otherwise true when their byte spans in one
    storage intersect. Metadata only, no synchronisation; False under torch.compile and for meta tensors, which
    have no storage."""
    if torch.compiler.is_compiling() or a.device.type == "meta" or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _byte_span(a), _byte_span(b)
    if not (a0 < b1 and b0 < a1):
        return False
    size = a.element_size()
    if a.shape != b.shape or a.stride() != b.stride() or b.element_size() != size or (b0 - a0) % size:
        return True
    dims = sorted(((st, n) for st, n in zip(a.stride(), a.shape) if n > 1), reverse=True)
    for k, (st, _) in enumerate(dims):
        if st <= sum((n - 1) * s2 for s2, n in dims[k + 1:]):     # not a plain strided layout: stay conservative
            return True
    return _hits(abs(b0 - a0) // size, dims)


def capturing(t: torch.Tensor) -> bool:
    """True while torch.compile traces or a CUDA graph captures work on ``t``'s device: checks that read
    values back to the host (a synchronisation) must be skipped then."""
    if torch.compiler.is_compiling():
        return True
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# ------------------------------------------------------------------ residual quantization arguments
def needs_grad(*tensors) -> bool:
    """Grad mode is on and an input requires grad: the ops then run the eager reference (no Triton autograd)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def check_map(name: str, x) -> None:
    check_tensor(name, x, ndim=4, dtypes=(torch.float32,))
    if x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty (B, C, H, W) tensor, got shape {tuple(x.shape)}")


def check_hw(name: str, hw) -> Tuple[int, int]:
    import numbers
    try:
        h, w = hw
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of positive ints (h, w), got {hw!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in (h, w)):
        raise TypeError(f"{name} must be a pair of positive ints (h, w), got {hw!r}")   # 2.5 is not a size
    h, w = int(h), int(w)
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be a pair of positive ints (h, w), got {hw!r}")
    return h, w


def check_codebook(codebook, C: Optional[int] = None, name: str = "codebook", finite: bool = True) -> None:
    check_tensor(name, codebook, ndim=2, dtypes=(torch.float32,))
    if codebook.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row (V >= 1), got shape {tuple(codebook.shape)}")
    if C is not None and codebook.shape[1] != C:
        raise ValueError(f"{name} must have C={C} channels (shape (V, {C})), got shape {tuple(codebook.shape)}")
    if finite and not capturing(codebook) and not bool(torch.isfinite(codebook).all()):
        raise ValueError(f"{name} must be finite; it holds NaN or inf")


def check_indices(name: str, idx: torch.Tensor, V: int) -> None:
    if idx.numel() and not capturing(idx):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"{name} must hold codebook indices in [0, {V}) (V={V}), got values in [{lo}, {hi}]")


def check_phi(name: str, weight, bias, resi_ratio, C: int, like: torch.Tensor, like_name: str = "f") -> float:
    if weight is not None:
        check_tensor(f"{name} weight", weight, ndim=4, dtypes=(torch.float32,), shape=(C, C, 3, 3))
        check_same((like_name, f"{name} weight"), (like, weight), what="device")
    if bias is not None:
        if weight is None:
            raise ValueError(f"{name}: a bias needs a weight (Phi is the identity without a weight)")
        check_tensor(f"{name} bias", bias, ndim=1, dtypes=(torch.float32,), shape=(C,))
        check_same((like_name, f"{name} bias"), (like, bias), what="device")
    return check_finite_scalar(f"{name} resi_ratio", resi_ratio)


def check_phis(phis, S: int, C: int, like: torch.Tensor, like_name: str = "f") -> List[PhiParams]:
    if not isinstance(phis, (list, tuple)) or len(phis) != S:
        n = len(phis) if isinstance(phis, (list, tuple)) else type(phis).__name__
        raise ValueError(f"phis must be a list of {S} entries (one per scale: (weight, bias, resi_ratio) or None), "
                         f"got {n}")
    out = []
    for si, p in enumerate(phis):
        if p is None:
            out.append(None)
            continue
        if not isinstance(p, (list, tuple)) or len(p) != 3:
            raise ValueError(f"phis[{si}] must be (weight, bias, resi_ratio) or None, got {type(p).__name__}")
        r = check_phi(f"phis[{si}]", p[0], p[1], p[2], C, like, like_name)
        out.append(None if p[0] is None else (p[0], p[1], r))
    return out


# ------------------------------------------------------------------ the samplers' per-row error codes
# The Triton and CUDA kernels write these codes per row; the eager paths compute them with sample_error_codes, so
# that every backend raises the same message, naming the first bad row.
SAMPLE_ERRORS = {1: "logits hold NaN", 2: "a row of logits is entirely -inf", 4: "logits hold +inf"}
BIT_ERRORS = {1: "logits hold NaN", 2: "both logits of a bit are -inf", 4: "logits hold +inf"}


def sample_error_codes(x: torch.Tensor) -> torch.Tensor:
    """The kernels' error code of every row of ``x`` (``(..., V)`` float -> ``(...)`` int32; 0 = fine)."""
    return (torch.isnan(x).any(-1).int() | torch.isneginf(x).all(-1).int() << 1
            | torch.isposinf(x).any(-1).int() << 2)


def raise_for_sample_errors(err: torch.Tensor, after_cfg: bool, bits: bool = False) -> None:
    """``err``: per-row codes (0 = fine) of the token sampler, or of the bit sampler (``bits``: one row per bit).
    One reduction and one read back when all is well."""
    err = err.flatten()
    if not bool(err.any()):
        return
    rows = torch.nonzero(err).flatten()
    r = int(rows[0])
    code = int(err[r])
    problem = next(text for bit, text in (BIT_ERRORS if bits else SAMPLE_ERRORS).items() if code & bit)
    where = " after the CFG mix" if after_cfg else ""
    unit = "bit" if bits else "row"
    raise ValueError(f"{problem}{where}; cannot sample ({unit} {r} of {err.numel()}"
                     f"{'' if bits else ' flattened rows'}; {rows.numel()} bad {unit}(s))")
