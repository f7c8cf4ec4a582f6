"""Codebook lookup (``fastvar.ops.rq_lookup``) against the eager reference: identical indices, exact ties
to the lowest index, near ties, every tiling / split path of the kernel, bad input.

The eager reference is the official float32 formula (``addmm_``), so "identical" is the claim: the kernel
forms the same float32 distances (see ``triton_kernels/rq_lookup.py``)."""
import os

import pytest
import torch
import torch.nn.functional as F

from fastvar import ops
from fastvar.reference import quantize as ref


@pytest.fixture
def gen():
    """A generator seeded at random every run; the seed is in every failure message."""
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def assert_indices(idx, expected, z, codebook, what, rare: bool = True):
    """Identical indices. Where the kernel's float32 arithmetic may differ from eager's (Triton 3.6's
    interpreter rounds ``tl.fma`` twice; a GPU whose cuBLAS sums in another order), a differing row must be a
    near tie: its two candidates' exact distances within 64 float32 ulps of the distance scale (and, with
    ``rare``, at most 1 row in 1000 may differ)."""
    from fastvar.triton_kernels.upsample import interpreter_fma_is_exact
    strict = os.environ.get("FASTVAR_BACKEND") == "eager" or (z.device.type == "cpu" and interpreter_fma_is_exact())
    differ = (idx != expected).nonzero()[:, 0]
    if strict or not len(differ):
        assert not len(differ), f"{what}: {len(differ)} rows differ from the eager reference"
        return
    zd, cb = z[differ].double(), codebook.double()
    d64 = (zd[:, None, :] - cb[None]).square().sum(-1)
    gap = (d64.gather(1, idx[differ, None]) - d64.gather(1, expected[differ, None])).abs()[:, 0]
    scale = d64.gather(1, expected[differ, None])[:, 0] + zd.square().sum(1) + cb[expected[differ]].square().sum(1)
    assert (gap <= 64 * 2.0 ** -24 * scale).all(), f"{what}: a row that differs from eager is not a near tie"
    assert not rare or len(differ) <= max(2, len(idx) // 1000), \
        f"{what}: {len(differ)} of {len(idx)} rows differ from eager"


def _noncontig(x: torch.Tensor) -> torch.Tensor:
    """The same values in a transposed layout."""
    return x.t().contiguous().t()


@pytest.mark.parametrize("N,V,C", [(2, 300, 8), (37, 257, 17), (130, 1000, 32), (19, 160, 64)])
@pytest.mark.parametrize("noncontig", [False, True])
def test_lookup_matches_reference(cpu_backend, gen, N, V, C, noncontig):
    g, seed = gen
    z = torch.randn(N, C, generator=g)
    codebook = torch.randn(V, C, generator=g)
    if noncontig:
        z, codebook = _noncontig(z), _noncontig(codebook)
    idx, codes = ops.rq_lookup(z, codebook, return_codes=True)
    expected = ref.rq_lookup(z, codebook)
    assert idx.dtype == torch.int64 and idx.shape == (N,)
    assert_indices(idx, expected, z, codebook, f"seed {seed}")
    assert torch.equal(codes, F.embedding(idx, codebook))
    assert torch.equal(ops.rq_lookup(z, codebook), idx)


def test_lookup_exact_ties_go_to_the_lowest_index(cpu_backend, gen):
    g, seed = gen
    V, C = 700, 32
    codebook = torch.randn(V, C, generator=g)
    src = torch.randperm(V // 2, generator=g)[:40]
    dst = V // 2 + torch.randperm(V - V // 2, generator=g)[:40]
    codebook[dst] = codebook[src]                 # duplicated rows, some in later tiles of the codebook
    codebook[V - 1] = codebook[3]                 # a duplicate in the very last (masked) tile
    pick = torch.cat([src, torch.tensor([3])])
    z = torch.cat([codebook[pick], codebook[pick] + 1e-3 * torch.randn(len(pick), C, generator=g)])
    idx = ops.rq_lookup(z, codebook)
    assert_indices(idx, ref.rq_lookup(z, codebook), z, codebook, f"seed {seed}")
    assert torch.equal(idx[:len(pick)], pick), f"seed {seed}: an exact tie did not go to the lowest index"


def test_lookup_near_ties(cpu_backend, gen):
    """z halfway between two codes (plus a few ulps of noise): the float32 distances nearly tie."""
    g, seed = gen
    V, C, N = 512, 32, 96
    codebook = torch.randn(V, C, generator=g)
    a, b = torch.randint(0, V, (N,), generator=g), torch.randint(0, V, (N,), generator=g)
    z = (codebook[a] + codebook[b]) * 0.5
    z = z * (1 + 4e-7 * torch.randn(N, C, generator=g))
    idx = ops.rq_lookup(z, codebook)
    assert_indices(idx, ref.rq_lookup(z, codebook), z, codebook, f"seed {seed}", rare=False)


@pytest.mark.interpreter
@pytest.mark.parametrize("split,block_n,block_v", [(1, 16, 32), (3, 16, 32), (7, 32, 16), (100, 16, 64)])
def test_lookup_kernel_tiles_and_splits(gen, split, block_n, block_v):
    """Every path of the launcher: several row blocks and codebook tiles, masked tails, codebook splits
    combined by the atomic (distance, index) minimum; duplicated rows across splits."""
    from fastvar.triton_kernels import rq_lookup as kernel
    g, seed = gen
    N, V, C = 45, 203, 24
    z = torch.randn(N, C, generator=g)
    codebook = torch.randn(V, C, generator=g)
    codebook[150:160] = codebook[5:15]
    z[:10] = codebook[5:15]
    zz, ee = torch.sum(z.square(), dim=1), torch.sum(codebook.square(), dim=1)
    idx, codes = kernel.rq_lookup(z, codebook, zz, ee, return_codes=True, split=split, block_n=block_n,
                                  block_v=block_v)
    expected = ref.rq_lookup(z, codebook)
    assert_indices(idx, expected, z, codebook, f"seed {seed}")
    assert torch.equal(idx[:10], torch.arange(5, 15))
    assert torch.equal(codes, codebook[idx])


@pytest.mark.interpreter
@pytest.mark.parametrize("C", [8, 17, 32, 40, 64])
def test_lookup_kernel_gpu_dot_path_in_the_interpreter(gen, C):
    """The GPU code path (16-channel ``tl.dot`` chunks chained through the accumulator, zero-padded) run by
    the interpreter, whose ``tl.dot`` is numpy's matmul: the same nearest codes (a different order could only
    flip a near tie, about 1 row in 10^5 here)."""
    from fastvar.triton_kernels import rq_lookup as kernel
    g, seed = gen
    N, V = 40, 300
    z = torch.randn(N, C, generator=g)
    codebook = torch.randn(V, C, generator=g)
    zz, ee = torch.sum(z.square(), dim=1), torch.sum(codebook.square(), dim=1)
    idx, _ = kernel.rq_lookup(z, codebook, zz, ee, loop_dot=False, block_n=16, block_v=64, split=2)
    expected = ref.rq_lookup(z, codebook)
    assert torch.equal(idx, expected) or (idx != expected).sum() <= 1, f"seed {seed}"


@pytest.mark.parametrize("kw,err,match", [
    (dict(z=torch.randn(4, 8), codebook=torch.randn(10, 9)), ValueError, r"codebook must have C=8 channels \(shape \(V, 8\)\), got shape \(10, 9\)"),
    (dict(z=torch.randn(4, 8), codebook=torch.randn(0, 8)), ValueError, r"codebook must have at least one row"),
    (dict(z=torch.tensor([[0.0, float("nan")]]), codebook=torch.randn(3, 2)), ValueError, r"z must be finite"),
    (dict(z=torch.tensor([[0.0, float("inf")]]), codebook=torch.randn(3, 2)), ValueError, r"z must be finite"),
    (dict(z=torch.randn(2, 2), codebook=torch.tensor([[0.0, float("inf")]])), ValueError, r"codebook must be finite"),
    (dict(z=torch.randn(4, 8).double(), codebook=torch.randn(10, 8)), TypeError, r"z must have dtype in \['torch.float32'\], got torch.float64"),
    (dict(z=torch.randn(4, 8, 1), codebook=torch.randn(10, 8)), ValueError, r"z must have 2 dims, got shape \(4, 8, 1\)"),
    (dict(z=[[0.0]], codebook=torch.randn(10, 1)), TypeError, r"z must be a torch.Tensor, got list"),
])
def test_lookup_bad_input(cpu_backend, kw, err, match):
    with pytest.raises(err, match=match):
        ops.rq_lookup(**kw)


def test_lookup_keeps_autograd_on_the_eager_path():
    z = torch.randn(5, 4, requires_grad=True)
    codebook = torch.randn(9, 4, requires_grad=True)
    idx, codes = ops.rq_lookup(z, codebook, return_codes=True)
    codes.sum().backward()
    assert codebook.grad is not None and torch.equal(idx, ref.rq_lookup(z.detach(), codebook.detach()))


# ------------------------------------------------------------------------------------------- GPU lane
@pytest.mark.gpu
@pytest.mark.parametrize("N,V,C", [(1, 4096, 32), (2, 4096, 32), (64 * 256, 4096, 32), (16 * 1024, 16384, 64),
                                   (4 * 1024, 4096, 8), (3000, 1000, 17)])
def test_lookup_gpu_against_eager_cuda(gen, N, V, C):
    """Against eager PyTorch on the GPU (cuBLAS, TF32 off). Identical indices expected; any row that differs
    must be a near tie of the eager float32 distances (a different dot-product order in cuBLAS), and rare."""
    g, seed = gen
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        z = torch.randn(N, C, generator=g).cuda()
        codebook = torch.randn(V, C, generator=g).cuda()
        n_ties = min(8, N)
        codebook[V // 2:V // 2 + n_ties] = codebook[:n_ties]
        z[:n_ties] = codebook[:n_ties]
        idx = ops.rq_lookup(z, codebook)
        expected = ref.rq_lookup(z, codebook)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert torch.equal(idx[:n_ties], torch.arange(n_ties, device="cuda")), f"seed {seed}: exact ties"
    assert_indices(idx, expected, z, codebook, f"seed {seed} (vs eager cuBLAS)")
