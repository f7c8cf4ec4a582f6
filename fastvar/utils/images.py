"""Image grids and image files: PNG with no imaging dependency (zlib + CRC chunks); other formats (JPEG, WebP,
...) through Pillow where it is installed, chosen by the file's extension, never PNG bytes under another name."""
from __future__ import annotations

import math
import os
import struct
import zlib
from typing import Optional, Tuple

import torch

from fastvar.utils.files import atomic_write, check_writable


def make_grid(images: torch.Tensor, ncol: Optional[int] = None, pad: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """``(N, 3, H, W)`` in [0, 1] -> one ``(3, H', W')`` image, ``ncol`` images per row (default ~sqrt(N))."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    N, C, H, W = images.shape
    ncol = max(1, min(N, ncol or math.ceil(math.sqrt(N))))
    nrow = math.ceil(N / ncol)
    grid = images.new_full((C, pad + nrow * (H + pad), pad + ncol * (W + pad)), pad_value)
    for i in range(N):
        r, c = divmod(i, ncol)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[:, y:y + H, x:x + W] = images[i]
    return grid


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``(..., C, H, W)`` float in [0, 1] -> ``(..., H, W, C)`` uint8 (rounded to nearest), contiguous, on the CPU."""
    return images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).movedim(-3, -1).contiguous().cpu()


def check_decoded(images: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """``images`` decoded from ``latent``, or a ``ValueError`` if they hold NaN or inf (one read back per decode,
    never on the per-scale path): clamped to pixels, NaN would become a silent black picture."""
    if not bool(torch.isfinite(images).all()):
        where = "the latent already does (the codebook or Phi?)" if not bool(torch.isfinite(latent).all()) \
            else "from a finite latent: the VAE's decoder weights, or an overflow in its dtype"
        raise ValueError(f"the decoded images hold NaN or inf ({where}); no image is returned")
    return images


def to_uint8_hwc(image: torch.Tensor) -> bytes:
    """``(3, H, W)`` (or ``(1, H, W)``) float in [0, 1] -> raw RGB bytes, row-major. ``ValueError`` if the image
    holds NaN or inf (clamped and cast, NaN would become a silent black pixel)."""
    if image.is_floating_point() and not bool(torch.isfinite(image).all()):
        raise ValueError("image holds NaN or inf values; refusing to write it as pixels")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return to_uint8(image).numpy().tobytes()


def encode_png(image: torch.Tensor) -> bytes:
    """``(3, H, W)`` float image in [0, 1] -> PNG file bytes (8-bit RGB)."""
    _, H, W = image.shape
    raw = to_uint8_hwc(image)
    stride = 3 * W
    rows = b"".join(b"\x00" + raw[y * stride:(y + 1) * stride] for y in range(H))   # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b"")


def save_png(image: torch.Tensor, path: str) -> str:
    """Write ``image`` ``(3, H, W)`` in [0, 1] to ``path`` atomically (a temporary file renamed into
    place: an interrupted write leaves no half-written PNG). Returns the absolute path."""
    data = encode_png(image)
    return atomic_write(check_writable(path, "out"), lambda f: f.write(data))


def image_format(path: str) -> Tuple[str, bool]:
    """``(format, needs_pillow)`` for the file extension of ``path``: ``("PNG", False)`` for ``.png``; another
    extension Pillow can write (``.jpg``, ``.webp``, ...) gives Pillow's format name, if Pillow is installed.
    ``ValueError`` saying what to do otherwise (no extension, an unknown one, or Pillow missing)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".png":
        return "PNG", False
    if not ext:
        raise ValueError(f"{os.path.basename(path)!r} has no extension to name the image format: use a .png name "
                         f"(or another format Pillow writes, e.g. .jpg, with Pillow installed)")
    try:
        from PIL import Image
    except ImportError:
        raise ValueError(f"cannot write {ext} files: fastvar writes .png itself and other formats through "
                         f"Pillow, which is not installed (pip install pillow); or use a .png name") from None
    Image.init()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        can = {e for e, f in Image.registered_extensions().items() if f in Image.SAVE}
        common = [e for e in (".jpg", ".jpeg", ".webp", ".bmp", ".tiff", ".gif") if e in can]
        raise ValueError(f"cannot write {ext} files: the extension names the format; use .png or one Pillow "
                         f"writes ({', '.join(common)} and {len(can) - len(common)} more)")
    return fmt, True


def encode_image(image: torch.Tensor, fmt: str) -> bytes:
    """``(3, H, W)`` float image in [0, 1] -> the bytes of a file in ``fmt`` (``"PNG"``, or a Pillow format)."""
    if fmt == "PNG":
        return encode_png(image)
    import io
    from PIL import Image
    _, H, W = image.shape
    pil = Image.frombytes("RGB", (W, H), to_uint8_hwc(image))
    buf = io.BytesIO()
    pil.save(buf, format=fmt)
    return buf.getvalue()


def save_image(image: torch.Tensor, path: str) -> str:
    """Write ``image`` ``(3, H, W)`` in [0, 1] to ``path`` atomically, in the format its extension names (see
    :func:`image_format`). Returns the absolute path."""
    data = encode_image(image, image_format(path)[0])
    return atomic_write(check_writable(path, "out"), lambda f: f.write(data))
